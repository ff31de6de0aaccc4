"""What `constitution collect` and `constitution derive` write, written one way: the
constitution only once the validator takes it (checked in memory, as the loader would read
it, so a file the loader refuses is never written), and every file whole or not at all (a
temporary file renamed into place)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from cai_ray.core.constitution import ConstitutionError, constitution_from_text


def sha256_of(path: str | Path) -> str:
    """A file's sha256; of a folder, of its Parquet parts in name order (a label run's output)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*.parquet")) if p.is_dir() else [p]:
        h.update(f.read_bytes())
    return h.hexdigest()


def write_constitution(output: Path, text: str, error: type[Exception], what: str) -> dict:
    """``text`` to ``output`` once it validates as ``load_constitution(output)`` would read it;
    else ``error`` ("the ``what`` constitution is invalid, nothing written") and no file.
    → its summary."""
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        constitution = constitution_from_text(text, str(output))
    except ConstitutionError as e:
        raise error(f"the {what} constitution is invalid, nothing written:\n{e}") from None
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output)
    return constitution.summary()


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object a line, replacing ``path`` whole."""
    part = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with part.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(part, path)
