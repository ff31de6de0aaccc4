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
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from cai_ray.records import PROMPT_SCHEMA, RAW_LIMIT

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
ROLES = ("system", "user", "assistant")


class InputError(ValueError):
    pass


# -- one row → (prompt fields) or a reason --------------------------------------------------
def content_id(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


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
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        return None, f"prompt too long: {total} characters > inputs.max_prompt_chars={max_chars}"
    rid = row.get("id")
    if rid is None:
        rid = content_id(messages)
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None, f"field 'id' must be a string or integer, got {type(rid).__name__}"
    else:
        rid = str(rid)
        if not rid.strip():
            return None, "field 'id' is empty"
    meta = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages")}
    try:
        meta_json = json.dumps(meta, ensure_ascii=False, default=str) if meta else None
    except ValueError:
        meta_json = None
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
            c["raw"].append(None if raw is None else raw[:RAW_LIMIT])
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
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline="\n")
    lineno = 0
    while True:
        try:
            line = text.readline()
        except UnicodeDecodeError as e:
            # The rest of the file cannot be decoded reliably; record where and stop here.
            rows.add(lineno + 1, None, f"file is not valid UTF-8 from here on: {e}", None)
            break
        if not line:
            break
        lineno += 1
        if not line.strip():
            continue  # blank lines are not records
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            rows.add(lineno, None, f"invalid JSON: {e.msg} at column {e.colno}", line.rstrip("\n"))
        else:
            rows.add_row(lineno, row, max_chars, None)
        if len(rows) >= block:
            yield rows.flush()


def _iter_csv(stream, rows: _Rows, max_chars: int, block: int) -> Iterator[pa.Table]:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    reader = csv.DictReader(text)
    for record in reader:
        line = reader.line_num
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


def list_input_files(path: str) -> list[tuple[str, str]]:
    """(file, format) pairs for a file or a folder (recursively), sorted for stable order."""
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

    files = list_input_files(path)
    formats = dict(files)

    class PromptFiles(FileBasedDatasource):
        def _read_stream(self, f, file_path: str):
            fmt = formats.get(file_path) or formats.get(str(Path(file_path).resolve()))
            if fmt is None:
                fmt = SUFFIXES[Path(file_path).suffix.lower()]
            yield from read_file_blocks(f, file_path, fmt, max_chars, rows_per_block)

    source = PromptFiles([f for f, _ in files])
    return ray.data.read_datasource(source, num_cpus=num_cpus)


def read_local(path: str, max_chars: int, rows_per_block: int = 4096) -> pa.Table:
    """The same rows without Ray (tests, small tools)."""
    tables = []
    for file, fmt in list_input_files(path):
        with open(file, "rb") as fh:
            stream = pa.PythonFile(fh, mode="r")
            tables += list(read_file_blocks(stream, file, fmt, max_chars, rows_per_block))
    return pa.concat_tables(tables) if tables else PROMPT_SCHEMA.empty_table()
