"""An output folder on a local disk or on an object store (s3://, gs://, ... through pyarrow's
filesystems, with the usual credentials: AWS_* variables or an instance role, AWS_ENDPOINT_URL
for an S3-compatible store; GOOGLE_APPLICATION_CREDENTIALS for GCS).

What the stages rely on, on both:
- a file appears whole or not at all: on a disk it is written to a temp name (``.NAME.tmpPID``)
  and renamed; on an object store it is one PUT, which the store makes visible whole or not at
  all (there is no rename to use there, and none is needed);
- names are derived from content (a part is named by the ids in it), so a retried write
  replaces the same file instead of adding a second one;
- the manifest is written last, so a listing plus the manifest tells finished from not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def is_uri(path: str) -> bool:
    """s3://, gs://, abfs://, hdfs://...: through pyarrow's filesystems."""
    return "://" in str(path) and not str(path).startswith("file://")


class Store:
    """One output folder. Paths given to its methods are relative to it ('data/part-1.parquet')."""

    def __init__(self, root: str | Path):
        root = str(root)
        self.remote = is_uri(root)
        self.uri = root.rstrip("/") if self.remote else root
        if self.remote:
            import pyarrow.fs as pafs

            self.fs, path = pafs.FileSystem.from_uri(self.uri)
            self.root = path.rstrip("/")
            self.scheme = self.uri.split("://", 1)[0]
        else:
            self.fs, self.root, self.scheme = None, root, ""

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, rel: str) -> str:
        return self.address(rel)

    def child(self, rel: str) -> Store:
        return Store(self.address(rel))

    def address(self, rel: str = "") -> str:
        """What a user (and a manifest) calls the file: a path, or a URI."""
        if not rel:
            return self.uri
        return f"{self.uri}/{rel}" if self.remote else str(Path(self.root) / rel)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def local(self, rel: str = "") -> Path:
        assert not self.remote, "a local path of an object-store output"
        return Path(self.root) / rel

    # -- files ------------------------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        if not self.remote:
            self.local(rel).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.remote:
            with self.fs.open_output_stream(self._path(rel)) as f:
                f.write(data)
            return
        final = self.local(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, final)

    def read_bytes(self, rel: str) -> bytes:
        if self.remote:
            with self.fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        return self.local(rel).read_bytes()

    def exists(self, rel: str) -> bool:
        if self.remote:
            import pyarrow.fs as pafs

            return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound
        return self.local(rel).exists()

    def delete(self, rel: str) -> None:
        if self.remote:
            self.fs.delete_file(self._path(rel))
        else:
            self.local(rel).unlink(missing_ok=True)

    def delete_folder(self, rel: str = "") -> None:
        """The folder and everything in it (absent: nothing to do)."""
        if self.remote:
            if self.exists(rel):
                self.fs.delete_dir(self._path(rel))
        else:
            import shutil

            shutil.rmtree(self.local(rel), ignore_errors=True)

    def listdir(self, rel: str) -> list[str]:
        """Names of the files directly in folder ``rel`` (sorted; none when it is absent)."""
        if self.remote:
            import pyarrow.fs as pafs

            infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
            return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
        folder = self.local(rel)
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def parts(self, rel: str, suffix: str = ".parquet") -> list[str]:
        """Finished parts in folder ``rel``, as relative paths (temp files start with '.')."""
        return [f"{rel}/{n}" for n in self.listdir(rel) if n.startswith("part-") and n.endswith(suffix)]

    # -- formats ----------------------------------------------------------------------------
    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_json(self, rel: str, data: Any) -> None:
        self.write_text(rel, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def write_jsonl(self, rel: str, records: list[dict[str, Any]]) -> None:
        """One JSON object per line, the file whole (rejects, a stage's input)."""
        self.write_text(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def write_table(self, rel: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(rel, sink.getvalue().to_pybytes())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        if self.remote:
            return pq.read_table(self._path(rel), columns=columns, filesystem=self.fs)
        return pq.read_table(self.local(rel), columns=columns)

    def read_schema(self, rel: str) -> pa.Schema:
        if self.remote:
            return pq.read_schema(self._path(rel), filesystem=self.fs)
        return pq.read_schema(self.local(rel))

    def upload_folder(
        self, local: Path, rel: str = "", skip: tuple[str, ...] = (), skip_dirs: tuple[str, ...] = ()
    ) -> list[str]:
        """Every file under ``local`` to ``rel`` (a local store copies), but files named in
        ``skip`` and the top-level folders in ``skip_dirs``: what was written."""
        done = []
        files = (p for p in local.rglob("*") if p.is_file() and p.name not in skip)
        for f in sorted(p for p in files if p.relative_to(local).parts[0] not in skip_dirs):
            dest = "/".join(x for x in (rel, f.relative_to(local).as_posix()) if x)
            self.write_bytes(dest, f.read_bytes())
            done.append(dest)
        return done


def as_store(out: str | Path | Store) -> Store:
    return out if isinstance(out, Store) else Store(out)


def changed_settings(manifest_path, fingerprint: dict[str, Any]) -> list[str]:
    """Keys of ``fingerprint`` that differ from the one recorded in ``manifest_path`` (a
    path, or a storage.Store whose manifest.json is read; empty when there is no manifest or
    no recorded fingerprint): what forbids a resume."""
    if isinstance(manifest_path, Store):
        if not manifest_path.exists("manifest.json"):
            return []
        previous = manifest_path.read_json("manifest.json").get("fingerprint")
    elif not Path(manifest_path).exists():
        return []
    else:
        previous = json.loads(Path(manifest_path).read_text()).get("fingerprint")
    if not previous or previous == fingerprint:
        return []
    return sorted(k for k in fingerprint if previous.get(k) != fingerprint.get(k))
