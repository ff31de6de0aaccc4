"""Read prompt sources into rows of ``records.PROMPT_SCHEMA``, never losing one.

Formats: JSONL (``.jsonl``/``.json``, one object a line, with ``prompt`` or ``messages``),
Parquet, CSV, an HF dataset saved with ``save_to_disk`` (a folder with ``state.json`` and
``*.arrow``), or a folder holding any of these. Every input row becomes one output row:
either a good prompt with a stable id, or a reject with its file, line and reason.
Ids: the row's ``id`` field if present, else a hash of the conversation (so the same prompt
gets the same id in every run, which is what makes resume exact).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from cai_ray.batch.records import PROMPT_SCHEMA, RAW_LIMIT
from cai_ray.batch.storage import is_uri  # noqa: F401 - inputs and outputs tell a URI one way

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
ROLES = ("system", "user", "assistant")


class InputError(ValueError):
    pass


# -- one row → (prompt fields) or a reason --------------------------------------------------
def content_id(messages: list[dict[str, str]]) -> str:
    """20 hex characters of a hash of the conversation (roles and contents)."""
    h = hashlib.blake2b(digest_size=10)
    for m in messages:
        h.update(m["role"].encode())
        h.update(b"\x00")
        h.update(m["content"].encode())
        h.update(b"\x01")
    return h.hexdigest()


def conversation_id(*conversations: list[dict[str, str]]) -> str:
    """The id of a row that has none: a hash of its conversation(s) in order (a prompt row's
    is ``content_id`` of its prompt, so a prompt has one id in generate, label, train and eval,
    wherever it sits in whichever file)."""
    return content_id([m for conv in conversations for m in conv])


def given_id(value: Any) -> tuple[str | None, str | None]:
    """(id, None) for a usable ``id`` field (a non-empty string or an integer), (None, None)
    when there is none, (None, reason) for a bad one: never coerced from another type."""
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"field 'id' must be a string or integer, got {type(value).__name__}"
    rid = str(value)
    if not rid.strip():
        return None, "field 'id' is empty"
    if bad_text(rid):
        return None, f"field 'id': {bad_text(rid)}"
    return rid, None


def bad_text(text: str) -> str | None:
    """Why ``text`` cannot be stored as UTF-8 (a lone surrogate: valid JSON as "\\ud800", or an
    undecodable byte read with surrogateescape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = "an undecodable byte" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        return f"not valid Unicode text: {what} at character {e.start}"
    return None


def safe_text(text: str) -> str:
    """``text`` with anything UTF-8 cannot hold escaped (for a reject's raw copy)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validate_row(row: Any, max_chars: int) -> tuple[dict[str, Any] | None, str | None]:
    """Return (fields, None) for a good row or (None, reason). Never coerces a value."""
    if not isinstance(row, dict):
        return None, f"row must be a JSON object, got {type(row).__name__}"
    has_prompt, has_messages = row.get("prompt") is not None, row.get("messages") is not None
    if has_prompt and has_messages:
        return None, "row has both 'prompt' and 'messages'; keep one"
    if not has_prompt and not has_messages:
        return None, "missing 'prompt' (or 'messages')"
    if has_prompt:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            return None, f"field 'prompt' must be a string, got {type(prompt).__name__}"
        if not prompt.strip():
            return None, "empty prompt"
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return None, "field 'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
                return None, f"messages[{i}] must be an object with exactly 'role' and 'content'"
            if m["role"] not in ROLES:
                return None, f"messages[{i}].role must be one of {ROLES}, got {m['role']!r}"
            if not isinstance(m["content"], str):
                return None, f"messages[{i}].content must be a string"
        if messages[-1]["role"] != "user":
            return None, "the last message must be from the user"
        if not messages[-1]["content"].strip():
            return None, "empty prompt (last user message)"
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    for i, m in enumerate(messages):
        why = bad_text(m["content"])
        if why:
            return None, f"{'prompt' if has_prompt else f'messages[{i}].content'}: {why}"
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        return None, f"prompt too long: {total} characters > inputs.max_prompt_chars={max_chars}"
    rid, why = given_id(row.get("id"))
    if why:
        return None, why
    rid = rid or content_id(messages)
    # Other fields ride along as JSON (null fields are left out, as a columnar reader
    # cannot tell a null from a missing field).
    meta = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages") and v is not None}
    try:
        meta_json = json.dumps(meta, ensure_ascii=False, default=str) if meta else None
    except ValueError:
        meta_json = None
    if meta_json is not None and bad_text(meta_json):
        meta_json = json.dumps(meta, default=str)  # \\u escapes keep every character
    return {
        "id": rid,
        "prompt": messages[-1]["content"],
        "prompt_messages": messages,
        "meta": meta_json,
    }, None


class _Rows:
    """Column buffers for PROMPT_SCHEMA, flushed as Arrow tables."""

    def __init__(self, source: str):
        self.source = source
        self.cols: dict[str, list] = {name: [] for name in PROMPT_SCHEMA.names}

    def __len__(self) -> int:
        return len(self.cols["line"])

    def add(self, line: int, fields: dict | None, reason: str | None, raw: str | None) -> None:
        c = self.cols
        c["source"].append(self.source)
        c["line"].append(line)
        c["reject_reason"].append(reason)
        if fields is None:
            for k in ("id", "prompt", "prompt_messages", "meta"):
                c[k].append(None)
            c["raw"].append(None if raw is None else safe_text(raw[:RAW_LIMIT]))
        else:
            for k in ("id", "prompt", "prompt_messages", "meta"):
                c[k].append(fields[k])
            c["raw"].append(None)

    def add_row(self, line: int, row: Any, max_chars: int, raw: str | None = None) -> None:
        fields, reason = validate_row(row, max_chars)
        if reason is not None and raw is None:
            raw = json.dumps(row, ensure_ascii=False, default=str)
        self.add(line, fields, reason, raw)

    def flush(self) -> pa.Table:
        table = pa.Table.from_pydict(self.cols, schema=PROMPT_SCHEMA)
        self.cols = {name: [] for name in PROMPT_SCHEMA.names}
        return table


# -- file formats -------------------------------------------------------------------------
def _iter_jsonl(stream, rows: _Rows, max_chars: int, block: int) -> Iterator[pa.Table]:
    """Chunks of ``block`` lines: clean chunks take the vectorized Arrow path, chunks with
    anything odd (bad JSON, blank lines, non-UTF-8, 'messages' rows, mixed types) are read
    line by line in Python, which gives every bad line its own reason."""
    lineno = 0
    for lines in _line_chunks(stream, block):
        fast = _fast_jsonl_chunk(lines, lineno, rows.source, max_chars)
        if fast is not None:
            if len(rows):
                yield rows.flush()
            yield fast
        else:
            for i, raw_line in enumerate(lines, start=lineno + 1):
                _slow_jsonl_line(raw_line, i, rows, max_chars)
                if len(rows) >= block:
                    yield rows.flush()
        lineno += len(lines)


def _line_chunks(stream, max_lines: int, read_size: int = 1 << 20) -> Iterator[list[bytes]]:
    """Lists of at most ``max_lines`` raw lines (each ending in b"\\n" but maybe the last).
    Works on any stream with ``read(n)``: Ray's file streams do not support readline."""
    pending: list[bytes] = []
    tail = b""
    while True:
        data = stream.read(read_size)
        if not data:
            break
        parts = (tail + data).split(b"\n")
        tail = parts.pop()
        pending.extend(p + b"\n" for p in parts)
        while len(pending) >= max_lines:
            yield pending[:max_lines]
            pending = pending[max_lines:]
    if tail:
        pending.append(tail)
    if pending:
        yield pending


def _slow_jsonl_line(raw_line: bytes, lineno: int, rows: _Rows, max_chars: int) -> None:
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as e:
        rows.add(
            lineno,
            None,
            f"line is not valid UTF-8: {e.reason} at byte {e.start}",
            raw_line.decode("utf-8", errors="replace").rstrip("\n"),
        )
        return
    if not line.strip():
        return  # blank lines are not records
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        rows.add(lineno, None, f"invalid JSON: {e.msg} at column {e.colno}", line.rstrip("\n"))
    else:
        rows.add_row(lineno, row, max_chars, None)


_PROMPT_ONLY = pa.schema([pa.field("prompt", pa.string())])


def _fast_jsonl_chunk(lines: list[bytes], lineno: int, source: str, max_chars: int) -> pa.Table | None:
    """Vectorized read of a chunk of JSONL lines of the common ``{"prompt": str, ...}``
    shape; returns None when the chunk needs the line-by-line path."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.json as pj

    chunk = b"".join(lines)
    try:
        chunk.decode("utf-8")  # Arrow's JSON reader does not check UTF-8; we must
    except UnicodeDecodeError:
        return None
    try:
        table = pj.read_json(
            io.BytesIO(chunk),
            read_options=pj.ReadOptions(use_threads=False, block_size=max(1 << 20, len(chunk) + 1)),
            parse_options=pj.ParseOptions(explicit_schema=_PROMPT_ONLY, unexpected_field_behavior="infer"),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    n = table.num_rows
    names = table.column_names
    if n != len(lines) or "messages" in names:
        return None  # blank lines (not records) or conversation rows: the careful path
    id_col = table["id"] if "id" in names else None
    if id_col is not None and not (
        pa.types.is_string(id_col.type) or pa.types.is_integer(id_col.type) or pa.types.is_null(id_col.type)
    ):
        return None
    prompt = table["prompt"]
    ok = pc.and_kleene(
        pc.is_valid(prompt),
        pc.and_kleene(
            pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(prompt)), 0),
            pc.less_equal(pc.utf8_length(prompt), max_chars),
        ),
    )
    if id_col is not None and pa.types.is_string(id_col.type):
        # an explicit id must not be empty (null means: hash the content)
        ok = pc.and_kleene(
            ok, pc.or_kleene(pc.is_null(id_col), pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(id_col)), 0))
        )
    ok = pc.fill_null(ok, False)
    ok_list = ok.to_pylist()
    prompts_py = prompt.to_pylist()
    ids: list[str | None] = [None] * n
    given = id_col.to_pylist() if id_col is not None else [None] * n
    for i in range(n):
        if ok_list[i]:
            ids[i] = str(given[i]) if given[i] is not None else content_id([{"role": "user", "content": prompts_py[i]}])
    reasons: list[str | None] = [None] * n
    raws: list[str | None] = [None] * n
    bad = [i for i in range(n) if not ok_list[i]]
    if bad:
        for i in bad:
            row = json.loads(lines[i])
            _, reasons[i] = validate_row(row, max_chars)
            raws[i] = lines[i].decode("utf-8").rstrip("\n")[:RAW_LIMIT]
            if reasons[i] is None:  # the two validators disagree: trust the careful one
                return None
    extra = [c for c in names if c not in ("id", "prompt")]
    meta: list[str | None] = [None] * n
    if extra:
        for i, rec in enumerate(table.select(extra).to_pylist()):
            if ok_list[i]:
                rec = {k: v for k, v in rec.items() if v is not None}
                meta[i] = json.dumps(rec, ensure_ascii=False, default=str) if rec else None
    kept = pc.if_else(ok, prompt, pa.scalar(None, pa.string())).combine_chunks()
    messages = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32)),
        pa.StructArray.from_arrays([pa.array(["user"] * n, pa.string()), kept], names=["role", "content"]),
        mask=pc.invert(ok).combine_chunks() if isinstance(ok, pa.ChunkedArray) else pc.invert(ok),
    )
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array([source] * n, pa.string()),
            pa.array(np.arange(lineno + 1, lineno + n + 1, dtype=np.int64)),
            kept,
            messages.cast(PROMPT_SCHEMA.field("prompt_messages").type),
            pa.array(meta, pa.string()),
            pa.array(reasons, pa.string()),
            pa.array(raws, pa.string()),
        ],
        schema=PROMPT_SCHEMA,
    )


def _iter_csv(stream, rows: _Rows, max_chars: int, block: int) -> Iterator[pa.Table]:
    """Rows of a CSV file with a header. An undecodable byte, a field over the csv module's
    size limit or a malformed line is a reject for that row (the reader goes on after it),
    never the end of the file."""
    # read invalid UTF-8 as surrogate escapes: validate_row rejects them with a reason
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
    csv.field_size_limit(max(csv.field_size_limit(), 4 * max_chars + 1024))
    reader = csv.DictReader(text)
    last = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            last += 1
            rows.add(last, None, f"unreadable CSV row: {e}", None)
            continue
        line = last = reader.line_num
        if None in record:
            rows.add(line, None, "row has more fields than the header", json.dumps(record[None]))
        else:
            record = {k: (None if v == "" and k in ("id", "messages") else v) for k, v in record.items()}
            if isinstance(record.get("messages"), str):
                try:
                    record["messages"] = json.loads(record["messages"])
                except json.JSONDecodeError as e:
                    rows.add(line, None, f"column 'messages' is not valid JSON: {e.msg}", record["messages"])
                    continue
            rows.add_row(line, record, max_chars)
        if len(rows) >= block:
            yield rows.flush()


def _iter_batches(batches, rows: _Rows, max_chars: int, block: int) -> Iterator[pa.Table]:
    n = 0
    for batch in batches:
        for record in batch.to_pylist():
            n += 1
            rows.add_row(n, record, max_chars)
            if len(rows) >= block:
                yield rows.flush()


def read_file_blocks(stream, path: str, fmt: str, max_chars: int, block: int) -> Iterator[pa.Table]:
    """Blocks of PROMPT_SCHEMA rows from one file stream (the unit of a read task)."""
    import pyarrow.parquet as pq

    rows = _Rows(path)
    if fmt == "jsonl":
        yield from _iter_jsonl(stream, rows, max_chars, block)
    elif fmt == "csv":
        yield from _iter_csv(stream, rows, max_chars, block)
    elif fmt == "parquet":
        buf = stream.read_buffer() if hasattr(stream, "read_buffer") else pa.py_buffer(stream.read())
        batches = pq.ParquetFile(pa.BufferReader(buf)).iter_batches(batch_size=block)
        yield from _iter_batches(batches, rows, max_chars, block)
    elif fmt == "arrow":
        reader = pa.ipc.open_stream(stream)
        yield from _iter_batches(reader, rows, max_chars, block)
    else:  # pragma: no cover - guarded by list_input_files
        raise InputError(f"unsupported format {fmt!r}")
    if len(rows):
        yield rows.flush()


def fs_path(uri: str) -> str:
    """The path a pyarrow filesystem takes for ``uri``: s3://bucket/key → bucket/key."""
    return uri.split("://", 1)[1]


def resolve_input(path: str):
    """(filesystem or None for local paths, [(path, format)]) for a file or a folder
    (recursively), sorted for stable order. Cloud URIs (s3://bucket/prefix/, gs://...) are
    listed through pyarrow with the usual credentials chain (AWS_* variables, instance
    profile / IRSA, AWS_ENDPOINT_URL for S3-compatible stores); their paths stay URIs."""
    if is_uri(path):
        return _resolve_remote(path)
    return None, _list_local(path)


def _resolve_remote(uri: str):
    import pyarrow.fs as pafs

    scheme, entries = uri.split("://", 1)[0], []
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{uri}: cannot list it: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    if info.type == pafs.FileType.File:
        entries = [info]
    files = []
    for entry in sorted(entries, key=lambda e: e.path):
        suffix = Path(entry.path).suffix.lower()
        if entry.type != pafs.FileType.File or entry.base_name.startswith((".", "_")):
            continue
        if suffix not in SUFFIXES:
            if info.type == pafs.FileType.File:
                raise InputError(f"{uri}: unsupported file type {suffix!r} (use {', '.join(SUFFIXES)})")
            continue
        files.append((f"{scheme}://{entry.path}", SUFFIXES[suffix]))
    if not files:
        raise InputError(f"{uri}: no prompt files ({', '.join(SUFFIXES)}) under this prefix")
    return fs, files


def list_input_files(path: str) -> list[tuple[str, str]]:
    """(file, format) pairs for a file, a folder (recursively) or a cloud URI, sorted for
    stable order."""
    return resolve_input(path)[1]


def _list_local(path: str) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {path}")
    if p.is_file():
        fmt = SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            raise InputError(f"{path}: unsupported file type {p.suffix!r} (use {', '.join(SUFFIXES)})")
        return [(str(p.resolve()), fmt)]
    files = []
    hf_dirs = sorted(d.parent for d in p.rglob("state.json") if (d.parent / "dataset_info.json").exists())
    for d in hf_dirs:
        # An HF dataset saved with save_to_disk: its data is the Arrow files that state.json
        # lists; its two .json files are metadata, not prompts.
        state = json.loads((d / "state.json").read_text())
        for entry in state.get("_data_files", []):
            files.append((str((d / entry["filename"]).resolve()), "arrow"))
    for f in sorted(p.rglob("*")):
        if any(d == f.parent or d in f.parents for d in hf_dirs):
            continue
        if f.is_file() and not f.name.startswith((".", "_")) and f.suffix.lower() in SUFFIXES:
            files.append((str(f.resolve()), SUFFIXES[f.suffix.lower()]))
    if not files:
        raise InputError(f"{path}: no prompt files ({', '.join(SUFFIXES)}) in this folder")
    return files


def read_prompts(path: str, max_chars: int, rows_per_block: int, num_cpus: float = 0.25):
    """A Ray Dataset of PROMPT_SCHEMA rows (good rows and rejects) from ``path``."""
    import ray.data
    from ray.data.datasource import FileBasedDatasource

    fs, files = resolve_input(path)
    # Ray hands _read_stream the path it opened: local as listed, remote without the scheme
    formats = {fs_path(f) if fs is not None else f: fmt for f, fmt in files}
    scheme = path.split("://", 1)[0] + "://" if fs is not None else ""

    class PromptFiles(FileBasedDatasource):
        def _read_stream(self, f, file_path: str):
            fmt = formats.get(file_path) or formats.get(str(Path(file_path).resolve()))
            if fmt is None:
                fmt = SUFFIXES[Path(file_path).suffix.lower()]
            # rejects name the file as the user gave it: the URI, not the bucket-relative path
            source = file_path if "://" in file_path else scheme + file_path
            yield from read_file_blocks(f, source, fmt, max_chars, rows_per_block)

    source = PromptFiles(list(formats), filesystem=fs)
    # One read task per file, streaming blocks of rows_per_block: left to itself Ray Data
    # would also split every block to reach its default parallelism, multiplying the
    # per-block costs (ledger round trips, re-batching) for no gain.
    return ray.data.read_datasource(source, num_cpus=num_cpus, override_num_blocks=len(files))


def read_local(path: str, max_chars: int, rows_per_block: int = 4096) -> pa.Table:
    """The same rows without Ray (tests, small tools)."""
    tables = []
    fs, files = resolve_input(path)
    for file, fmt in files:
        if fs is not None:
            with fs.open_input_stream(fs_path(file)) as stream:
                tables += list(read_file_blocks(stream, file, fmt, max_chars, rows_per_block))
            continue
        with open(file, "rb") as fh:
            stream = pa.PythonFile(fh, mode="r")
            tables += list(read_file_blocks(stream, file, fmt, max_chars, rows_per_block))
    return pa.concat_tables(tables) if tables else PROMPT_SCHEMA.empty_table()


# -- whole files of rows, for the trainers and eval (small inputs, read into memory) ----------
# The same rules as the streaming reader above: bad text, the one id rule (given_id /
# conversation_id), every row either used or a reject with its source, line and reason.
Row = dict[str, Any]
Reject = dict[str, Any]


class RowsError(InputError):
    """A file with no usable rows, or none at all (train.data.TrainDataError is this)."""


def read_records(path: str) -> tuple[list[tuple[str, int, Row]], str]:
    """(source file, line or row number, record) for every input row, and what was read. A
    folder means a pipeline output: its ``data/part-*.parquet`` (or ``*.parquet``)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if p.is_dir():
        files = sorted((p / "data").glob("part-*.parquet")) or sorted(p.glob("*.parquet"))
        if not files:
            raise RowsError(f"{path}: no data/part-*.parquet or *.parquet files")
    elif p.suffix == ".parquet" and p.exists():
        files = [p]
    elif p.suffix in (".jsonl", ".json") and p.exists():
        out = []
        for i, raw in enumerate(p.read_bytes().split(b"\n"), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw.decode("utf-8", errors="replace")
                out.append(
                    (str(p), i, {"_invalid": f"line is not valid UTF-8: {e.reason} at byte {e.start}", "_raw": line})
                )
                continue
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    rec = {"_invalid": f"invalid JSON: {e.msg}", "_raw": line}
                if not isinstance(rec, dict):
                    rec = {"_invalid": "a row must be a JSON object", "_raw": line}
                else:
                    why = _bad_strings(rec)
                    if why:
                        rec = {"_invalid": why, "_raw": safe_text(line)}
                out.append((str(p), i, rec))
        return out, str(p)
    elif p.suffix == ".csv" and p.exists():
        return _csv_records(p), str(p)
    else:
        raise RowsError(f"{path}: not found, or not a folder / .jsonl / .csv / .parquet file")
    return [(str(f), i, r) for f in files for i, r in enumerate(pq.read_table(f).to_pylist(), 1)], str(p)


def _csv_records(p: Path) -> list[tuple[str, int, Row]]:
    """Rows of a CSV file with a header; an undecodable byte, an oversized field or a row with
    more fields than the header is that row's reject, the reading goes on."""
    import csv

    out: list[tuple[str, int, Row]] = []
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
    with open(p, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        last = 1
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                last += 1
                out.append((str(p), last, {"_invalid": f"unreadable CSV row: {e}", "_raw": ""}))
                continue
            last = reader.line_num
            if None in rec:
                out.append(
                    (str(p), last, {"_invalid": "row has more fields than the header", "_raw": safe_text(str(rec))})
                )
                continue
            why = _bad_strings(rec)
            out.append((str(p), last, {"_invalid": why, "_raw": safe_text(str(rec))} if why else rec))
    return out


def _bad_strings(value, where: str = "") -> str | None:
    """The first string in a record that UTF-8 cannot hold (a lone surrogate), as a reason."""
    if isinstance(value, str):
        why = bad_text(value)
        return f"{where or 'a field'}: {why}" if why else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        why = _bad_strings(v, f"{where}.{k}" if where else str(k))
        if why:
            return why
    return None


def load_rows(path: str, row_fn: Callable[[Row], tuple[Row | None, str | None]]) -> tuple[list[Row], list[Reject]]:
    """Rows ``row_fn`` accepts, and a reject for each one it does not (never both, never neither)."""
    rows, rejects = [], []
    for source, line, rec in read_records(path)[0]:
        row, why = (None, rec["_invalid"]) if "_invalid" in rec else row_fn(rec)
        if row is not None:
            rid, why = given_id(row.get("id", rec.get("id")))
            if why:
                row = None
            else:
                row["id"] = rid or conversation_id(*(row[k] for k in CONVERSATIONS if isinstance(row.get(k), list)))
        if row is None:
            rejects.append(reject(source, line, rec, why))
        else:
            rows.append(row)
    if not rows:
        from cai_ray.batch.records import reasons_count

        reasons = reasons_count(rejects)
        raise RowsError(f"{path}: no usable rows ({reasons or 'empty'})")
    return rows, rejects


def pref_row(r: Row) -> tuple[Row | None, str | None]:
    """A preference pair: the labeling output (``chosen``/``rejected`` conversations ending in
    the two answers, ``p_chosen``), or ``prompt`` (string or messages) + ``chosen`` +
    ``rejected`` (strings or one assistant message each) [+ ``p_chosen``]."""
    chosen, rejected = r.get("chosen"), r.get("rejected")
    if chosen is None or rejected is None:
        return None, "needs 'chosen' and 'rejected' (an unlabelled pair has neither)"
    prompt = r.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list) and (prompt is None or "prompt_messages" in r):
        # the labeling output: full conversations, the last turn the answer
        c, j = _messages(chosen), _messages(rejected)
        if c is None or j is None or len(c) < 2 or len(j) < 2:
            return None, "malformed chosen/rejected conversations"
        if c[:-1] != j[:-1]:
            return None, "chosen and rejected continue different conversations"
        prompt_msgs, answers = c[:-1], (c[-1], j[-1])
    else:
        if isinstance(prompt, str):
            prompt_msgs = [{"role": "user", "content": prompt}] if prompt.strip() else None
        else:
            prompt_msgs = _messages(prompt)
        if prompt_msgs is None:
            return None, "needs a non-empty 'prompt' (string or messages)"
        answers = []
        for name, v in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(v, str):
                v = [{"role": "assistant", "content": v}]
            v = _messages(v)
            if v is None or len(v) != 1:
                return None, f"'{name}' must be a string or one assistant message"
            answers.append(v[0])
    if any(a["role"] != "assistant" or not a["content"].strip() for a in answers):
        return None, "chosen and rejected must be non-empty assistant turns"
    if answers[0]["content"].strip() == answers[1]["content"].strip():
        return None, "chosen and rejected are identical"  # up to surrounding space: nothing to learn
    if prompt_msgs[-1]["role"] == "assistant":
        return None, "the prompt must end with a user turn"
    p = r.get("p_chosen")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.5 <= p <= 1):
        return None, f"p_chosen must be a number in [0.5, 1] (the chosen answer's probability), got {p!r}"
    return {
        "prompt": prompt_msgs,
        "chosen": [answers[0]],
        "rejected": [answers[1]],
        "p_chosen": None if p is None else float(p),
    }, None


# the conversation fields whose contents name a row without an ``id`` (readers.conversation_id)
CONVERSATIONS = ("prompt", "messages", "completion", "chosen", "rejected")


def reject(source: str, line: int, rec: Row, reason: str) -> Reject:
    raw = rec.get("_raw") if "_raw" in rec else json.dumps(rec, default=str)
    return {"source": source, "line": line, "id": rec.get("id"), "reason": reason, "raw": raw[:RAW_LIMIT]}


# -- row formats ---------------------------------------------------------------------------
def _messages(value: Any) -> list[dict] | None:
    """A clean message list, or None when ``value`` is not one."""
    if not isinstance(value, list) or not value:
        return None
    if not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
        for m in value
    ):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_row(r: dict) -> tuple[dict | None, str | None]:
    """``prompt`` (string) or ``messages`` ending with a user turn [+ ``reference``]."""
    if isinstance(r.get("prompt"), str):
        if not r["prompt"].strip():
            return None, "empty prompt"
        msgs = [{"role": "user", "content": r["prompt"]}]
    elif r.get("messages") is not None:
        msgs = _messages(r["messages"])
        if msgs is None:
            return None, "malformed messages (each needs role system|user|assistant and string content)"
        if msgs[-1]["role"] != "user":
            return None, "messages must end with a user turn (the policy answers it)"
    else:
        return None, "needs 'prompt' (string) or 'messages'"
    ref = r.get("reference")
    if ref is not None and (not isinstance(ref, str) or not ref.strip()):
        return None, "'reference' must be a non-empty string"
    return {"prompt": msgs, "reference": ref}, None
