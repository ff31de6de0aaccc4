"""Process-level plumbing shared by every job: Ray start/join, versions, manifests."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from cai_ray.config import submitted_job

log = logging.getLogger("cai_ray")

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
PACKAGES = ("cai-ray", "ray", "torch", "transformers", "pyarrow", "datasets", "vllm", "deepspeed", "trl")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the
    moment the handler was made (that one may be closed since: a test's capture, a
    redirected demo)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[_StderrHandler()],
    )


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` if given (or $RAY_ADDRESS, which `ray job submit` sets for a job's
    driver), else start a local Ray on 127.0.0.1 (or reuse one this process started)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    log.info("starting a local Ray instance on 127.0.0.1")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (servers, clusters and benchmarks started here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(resolved: str) -> dict[str, Any]:
    """Name, a hash of config.json and of the weight files' names, sizes and modification
    times, so a manifest (and the pipeline's skip check) tells a retrained model from the
    one that made a dataset, without reading gigabytes of weights."""
    p = Path(resolved)
    info: dict[str, Any] = {"path": resolved}
    if (p / "config.json").exists():
        info["config_sha256"] = file_sha256(p / "config.json")
        weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.gguf"))
        info["weights_bytes"] = sum(w.stat().st_size for w in weights)
        info["weights_stat_sha256"] = stat_sha256(weights, p)
    return info


# what a stage rewrites on every run, skipped or not: not part of what its output *holds*
_VOLATILE = ("manifest.json", "pipeline.json")


def stat_sha256(files: list[Path], root: Path) -> str:
    """SHA-256 over each file's path (relative to ``root``), size and modification time."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """stat_sha256 of every file a folder holds (a model, a stage's output), leaving out dot
    files (locks, temp parts), logs and the manifests a run rewrites."""
    files = sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        and f.name not in _VOLATILE
        and f.suffix != ".log"
        and "logs" not in f.relative_to(folder).parts[:-1]
    )
    return stat_sha256(files, folder)


@contextlib.contextmanager
def output_to_log(log_path: Path):
    """Everything written to this process's stdout and stderr — Ray's worker logs relayed to
    the driver, DeepSpeed, vLLM, progress bars, child processes — goes to ``log_path``; the
    context yields a text stream on the original terminal for the caller's own lines."""
    import io

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = io.TextIOWrapper(os.fdopen(os.dup(saved[0]), "wb", buffering=0), write_through=True)
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            console.flush()


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a (log) file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


class OutputBusy(ValueError):
    """Another run is writing into the same output folder."""


@contextlib.contextmanager
def output_lock(folder: Path):
    """Hold ``folder/.lock`` (an flock: released by the kernel when the holder dies) for a
    run: a second run into the same folder stops at once with who holds it, instead of
    deleting the first one's temp files and interleaving parts."""
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise OutputBusy(
            f"{folder} is being written by another run ({holder}); wait for it or pick another --output"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def base_manifest(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": stage,
        "status": "running",
        "started": now(),
        "command": sys.argv,
        "host": socket.gethostname(),
        "ray_job": (submitted_job() or {}).get("submission_id"),
        "config": config,
        "versions": versions(),
    }
