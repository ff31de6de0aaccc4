"""One GPU machine checked end to end, in under 8 minutes on one H200: the GPU tests, the whole
pipeline on tiny-random with every stage on the GPU, and `cai-ray serve` on a fractional GPU.

    make gpu-smoke                                     # the venv if there is one, else .gpu-kit/
    bash .gpu-kit/run.sh python3 jobs/bench/gpu_smoke.py --out $OUT   # the lent machine, through the kit
    python jobs/bench/gpu_smoke.py --device cpu        # the same steps on CPU, tiny sizes (~8 min, 2 cores)

Each step is a subprocess in its own process group under its own time box; one that runs out is
stopped (SIGINT, then SIGTERM, then SIGKILL to its group: its Ray daemons too), reported as
`timeout`, and the next step runs. The boxes add up to 450 s on a GPU; what a step leaves of
its box goes to the steps after it (--timeout STEP=S and --budget change them):

  gpu-tests     python -m pytest -q tests/gpu
  serve         cai-ray serve, tiny-random on a 0.5-GPU replica: one chat request and one streamed one
                (httpx, greedy: the stream must equal the answer), then SIGINT
  pipeline-ppo  cai-ray pipeline --config jobs/configs/pipeline_gpu_smoke.yaml --until ppo: generate and label
                (hf engines in 0.5-GPU Ray Data actors), sft (ZeRO-3), rm (ZeRO-2), ppo (ZeRO-3, hf
                rollouts), each trainer one Ray Train worker with a GPU (NCCL)
  pipeline-dpo  the same run folder with rl=dpo: generate, sft and label are skipped (finished, same
                fingerprints), then dpo (ZeRO-3) and eval (base vs SL-CAI vs RL-CAI, 0.5-GPU pools)

A pipeline step's stage rows come from the run's pipeline.json (status, seconds). Peak memory is
sampled every 0.5 s in a thread: on a GPU the device's memory.used from nvidia-smi (every process
on GPU 0: the steps are subprocesses and Ray workers, so torch.cuda.max_memory_allocated of this
process would see none of it); with --device cpu the host's memory in use (MemTotal - MemAvailable,
the whole machine, other users included). The table is printed and written to OUT/summary.md and
OUT/summary.json, with every step's log and pipeline.json in OUT/logs.tgz (three files: the device
tool brings back at most 8). Exit status 0 only when every step not left out by --skip is ok.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "jobs" / "configs" / "pipeline_gpu_smoke.yaml"
STEPS = ("gpu-tests", "serve", "pipeline-ppo", "pipeline-dpo")
# each step's time box in seconds (one H200, 2 CPU cores); the seconds a step leaves unused go
# to the next ones, so the pipeline gets what the quick steps spare. The GPU boxes add up to
# 450 s: with start-up, stopping and the report, under 8 minutes.
TIME_BOX = {"gpu-tests": (120, 120), "serve": (45, 180), "pipeline-ppo": (200, 900), "pipeline-dpo": (85, 600)}
PPO_STAGES = ("generate", "sft", "label", "rm", "ppo")
DPO_STAGES = ("generate", "sft", "label", "dpo", "eval")
# --device cpu: pipeline_gpu_smoke.yaml with no GPU anywhere and the sizes of tests/support/pipeline.py's TINY
CPU_OVERRIDES = [
    *(f"{pool}.gpus_per_actor=0" for pool in ("generate.pool", "label.policy_pool", "label.labeler_pool")),
    *(f"{pool}.gpus_per_actor=0" for pool in ("eval.pool", "eval.judge_pool")),
    *(f"{stage}.scaling.use_gpu=false" for stage in ("sft", "rm", "ppo", "dpo")),
    "generate.sampling.max_new_tokens=8",
    "label.sampling.max_new_tokens=8",
    "ppo.rollout.max_new_tokens=4",
    "ppo.ppo.steps=1",
    "ppo.ppo.rollout_batch=4",
    "ppo.monitor.every=1",
    "ppo.monitor.probe_max_new_tokens=4",
    "ppo.checkpoint.every_steps=1",
    "eval.limit=2",
    "eval.sampling.max_new_tokens=8",
]
PACKAGES = ("torch", "transformers", "ray", "deepspeed", "trl", "httpx")


@dataclass
class Result:
    name: str
    status: str  # ok | failed | timeout | skipped | not reached
    seconds: float | None = None
    peak_gib: float | None = None
    note: str = ""
    stages: list[Result] = field(default_factory=list)


# -- peak memory ---------------------------------------------------------------------------------
class MemorySampler(threading.Thread):
    """Memory in use, every `every` seconds, as (time, GiB); peak(t0, t1) is the largest sample
    between two times. GPU: nvidia-smi's memory.used of GPU 0. CPU: the host's."""

    def __init__(self, device: str, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.samples, self._done = every, [], threading.Event()
        if device == "cpu":
            self.source, self.read = "host memory in use (MemTotal - MemAvailable, whole machine)", _host_gib
        elif shutil.which("nvidia-smi"):
            self.source, self.read = "nvidia-smi memory.used of GPU 0 (every process on the device)", _gpu_gib
        else:
            self.source, self.read = "none (no nvidia-smi)", lambda: None

    def run(self):
        while not self._done.is_set():
            try:
                used = self.read()
            except (OSError, ValueError, subprocess.SubprocessError):
                used = None
            if used is not None:
                self.samples.append((time.time(), used))
            self._done.wait(self.every)

    def stop(self):
        self._done.set()

    def peak(self, t0: float, t1: float) -> float | None:
        inside = [gib for t, gib in list(self.samples) if t0 <= t <= t1]
        return round(max(inside), 2) if inside else None


def _gpu_gib() -> float:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout
    return int(out.strip().splitlines()[0]) / 1024  # MiB


def _host_gib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
    return kib / 2**20


# -- running a step -------------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    for key, value in {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        env.setdefault(key, value)
    return env


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """End a step's process group: SIGINT to the driver first (it shuts its Ray down itself;
    Ray's daemons block SIGINT), then SIGTERM and SIGKILL to whatever of the group is left.
    Ray's daemons and workers share the driver's group, so a step that ran out leaves nothing
    holding GPU memory or ports for the next one."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(proc, 5.0):
            break
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group's id is the driver's pid
        except ProcessLookupError:
            break
    _group_alive(proc, 5.0)
    proc.wait()


def _group_alive(proc: subprocess.Popen, wait: float) -> bool:
    """Whether a process of the group (the driver's pid) still runs, waiting up to `wait` s
    for it to end; zombies do not count (their memory is freed; init reaps them)."""
    end = time.time() + wait
    while True:
        proc.poll()  # reap our own child
        if not any(pgrp == proc.pid and state not in "ZX" for state, pgrp in _processes()):
            return False
        if time.time() >= end:
            return True
        time.sleep(0.2)


def _processes():
    """(state, process group) of every process, from /proc (Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)"
        except OSError:
            continue  # gone meanwhile
        yield fields[0], int(fields[2])


def one_line(error: str) -> str:
    """A stage's recorded error (a traceback, maybe) as one line: its last "...Error: ..." line."""
    lines = [x.strip() for x in error.splitlines() if x.strip()]
    named = [x for x in lines if x.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (named or lines or [""])[-1][:160]


def last_error(log: Path) -> str:
    """The last line of a failed step's log that names an error, for the table."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    hits = [x for x in lines if not x.startswith("[gpu_smoke]") and ("Error" in x or "error:" in x)]
    return (hits or [""])[-1][:160]


def run_command(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> str:
    """ok | failed | timeout; the command's output goes to `log`."""
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        f.write(f"[gpu_smoke] process group {proc.pid}, time box {timeout:.0f} s\n")
        f.flush()
        try:
            status = "ok" if proc.wait(timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        stop_group(proc)
        f.write(f"\n[gpu_smoke] {status} (exit status {proc.returncode})\n")
    return status


def pytest_note(log: Path) -> str:
    """pytest's summary line ("7 passed, 1 skipped in 95.3s")."""
    lines = [x.strip("= \n") for x in log.read_text(errors="replace").splitlines()]
    counts = [x for x in lines if any(w in x for w in (" passed", " failed", " skipped", " error")) and " in " in x]
    return counts[-1] if counts else ""


def stage_rows(run: Path, names: tuple[str, ...], t0: float, step_status: str, mem: MemorySampler) -> list[Result]:
    """One row per pipeline stage from pipeline.json: ok (ran in this step), skipped (finished
    earlier), failed, timeout (running when the step was stopped) or not reached."""
    path = run / "pipeline.json"
    stages = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}
    ran = [n for n in names if n in stages]
    stopped = ran[-1] if step_status == "timeout" and ran else None  # in progress when the box ran out
    rows = []
    for name in names:
        rec = stages.get(name)
        if not rec:
            rows.append(Result(name, "not reached"))
            continue
        start = dt.datetime.fromisoformat(rec["started"]).timestamp()
        ended = rec.get("finished") or rec.get("failed")
        end = dt.datetime.fromisoformat(ended).timestamp() if ended else time.time()
        note = one_line(rec.get("error") or "")
        if rec["status"] == "finished":
            status = "ok" if start >= t0 - 1 else "skipped"
        elif name == stopped:  # stopped by SIGINT, the pipeline records it as failed; killed, as running
            status, note = "timeout", "stopped at the time box"
        else:
            status = "failed"
        seconds = rec.get("seconds") if status == "ok" else None
        rows.append(Result(name, status, seconds, mem.peak(start, end + 1) if status != "skipped" else None, note))
    return rows


def pipeline_step(name, extra, run, box, log, env, mem, args) -> Result:
    t0 = time.time()
    cmd = [sys.executable, "-m", "cai_ray.cli", "pipeline", "--config", str(args.config), "--output", str(run)]
    cmd += [*extra, *(CPU_OVERRIDES if args.device == "cpu" else []), *args.overrides]
    status = run_command(cmd, log, box, env)
    names = PPO_STAGES if name == "pipeline-ppo" else DPO_STAGES
    rows = stage_rows(run, names, t0, status, mem)
    skipped = [r.name for r in rows if r.status == "skipped"]
    note = f"{', '.join(skipped)}: done earlier, skipped" if skipped else ""
    if status == "failed" and not any(r.note for r in rows):
        note = last_error(log)  # it failed before a stage did (a config error, say)
    return Result(name, status, note=note, stages=[r for r in rows if r.status != "skipped"])


def serve_step(box: float, log: Path, env: dict[str, str], args) -> Result:
    """`cai-ray serve` on tiny-random; ready once /v1/models answers; one chat completion and
    one streamed completion, both greedy (the stream must equal the answer); then SIGINT."""
    import httpx

    from cai_ray.runtime import free_port

    key, port = secrets.token_hex(16), free_port()
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    gpus = 0 if args.device == "cpu" else 0.5
    cmd = [sys.executable, "-m", "cai_ray.cli", "serve", "--config", "jobs/configs/serve_tiny.yaml"]
    cmd += [
        "--policy",
        "tiny-random",
        "--port",
        str(port),
        "scaling.max_replicas=1",
        f"scaling.gpus_per_replica={gpus}",
    ]
    deadline = time.time() + box
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "temperature": 0}
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, "CAI_RAY_API_KEY": key},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        f.write(f"[gpu_smoke] process group {proc.pid}, time box {box:.0f} s\n")
        f.flush()
        try:
            while True:  # up: the app answers (serve.run returns before its replica is ready)
                if proc.poll() is not None:
                    return Result("serve", "failed", note=f"the server exited ({proc.returncode}) before it was up")
                if time.time() > deadline:
                    return Result("serve", "timeout", note="not up in time")
                try:
                    if httpx.get(f"{url}/v1/models", headers=auth, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            up = box - (deadline - time.time())

            def left() -> float:
                return max(1.0, deadline - time.time())

            r = httpx.post(f"{url}/v1/chat/completions", headers=auth, json=body, timeout=left())
            r.raise_for_status()
            answer = r.json()["choices"][0]["message"]["content"]
            pieces, done = [], False
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", headers=auth, json={**body, "stream": True}, timeout=left()
            ) as s:
                s.raise_for_status()
                for line in s.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
            streamed = "".join(pieces)
            note = f"up in {up:.0f} s; chat {len(answer)} chars; stream {len(pieces)} chunks"
            if not done or streamed != answer:
                return Result("serve", "failed", note=f"{note}, {'[DONE]' if done else 'no [DONE]'}, differs from chat")
            return Result("serve", "ok", note=f"{note} = chat")
        except httpx.TimeoutException:
            return Result("serve", "timeout", note="a request ran out of time")
        except (httpx.HTTPError, ValueError, KeyError) as e:
            return Result("serve", "failed", note=f"{type(e).__name__}: {e}"[:160])
        finally:
            stop_group(proc, grace=20.0)
            f.write(f"\n[gpu_smoke] server stopped (exit status {proc.returncode})\n")


# -- the report ----------------------------------------------------------------------------------
def table(results: list[Result], total: float, unit: str) -> list[tuple[str, ...]]:
    def fmt(r: Result, indent: str = "") -> tuple[str, ...]:
        secs = "-" if r.seconds is None else f"{r.seconds:.1f}"
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        return (indent + r.name, r.status, secs, peak, r.note)

    rows = [("step", "result", "seconds", f"peak {unit} GiB", "note")]
    for r in results:
        rows.append(fmt(r))
        rows += [fmt(s, "  ") for s in r.stages]
    peaks = [r.peak_gib for r in results if r.peak_gib is not None]
    rows.append(("total", "", f"{total:.1f}", f"{max(peaks):.2f}" if peaks else "-", ""))
    return rows


def text_table(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip()
        for r in rows
    )


def markdown_table(rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def machine(device: str) -> str:
    if device == "gpu" and shutil.which("nvidia-smi"):
        q = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader", "-i", "0"]
        return subprocess.run(q, capture_output=True, text=True, timeout=10).stdout.strip()
    return f"CPU only, {os.cpu_count()} cores"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:  # metadata only: importing torch here would put a CUDA context on the GPU
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="gpu (default) | cpu: tiny sizes")
    parser.add_argument("--cpu", action="store_const", const="cpu", dest="device", help="the same as --device cpu")
    parser.add_argument(
        "--out", type=Path, help="summary.md, summary.json, logs.tgz (default: $OUT if set, else out/gpu-smoke)"
    )
    parser.add_argument("--work", type=Path, help="run folder of the steps (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, data) at the end")
    parser.add_argument("--budget", type=float, help="seconds for all steps: scales every box (gpu 450)")
    parser.add_argument("--timeout", action="append", default=[], metavar="STEP=S", help="a step's time box")
    parser.add_argument("--skip", action="append", default=[], choices=STEPS, help="leave a step out")
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help="the pipeline config (default pipeline_gpu_smoke.yaml)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline config overrides (both runs)")
    args = parser.parse_args()

    boxes = {k: v[0 if args.device == "gpu" else 1] for k, v in TIME_BOX.items()}
    if args.budget:  # every box stretched or shrunk alike to fill the budget
        scale = args.budget / max(1.0, sum(boxes[s] for s in STEPS if s not in args.skip))
        boxes = {k: v * scale for k, v in boxes.items()}
    for item in args.timeout:
        step, _, secs = item.partition("=")
        if step not in boxes or not secs.replace(".", "", 1).isdigit():
            parser.error(f"--timeout expects STEP=SECONDS with STEP one of {', '.join(STEPS)}, got {item!r}")
        boxes[step] = float(secs)
    budget = sum(boxes[s] for s in STEPS if s not in args.skip)
    if args.device == "gpu" and subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode:
        parser.error("no NVIDIA GPU here (nvidia-smi -L failed): run with --device cpu")
    out = (args.out or Path(os.environ.get("OUT") or ROOT / "out" / "gpu-smoke")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="cai-gpu-smoke-"))).resolve()
    logs, run = work / "logs", work / "run"
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env()
    mem = MemorySampler(args.device)
    mem.start()
    time.sleep(1.0)
    baseline = mem.peak(0, time.time())
    where = machine(args.device)
    print(f"gpu-smoke ({args.device}) on {where}; budget {budget:.0f} s; work {work}", flush=True)

    start = time.time()
    results: list[Result] = []
    spare = 0.0  # seconds earlier steps left of their boxes
    for i, name in enumerate(STEPS):
        reserved = sum(boxes[s] for s in STEPS[i + 1 :] if s not in args.skip)  # the later steps' boxes
        box = min(boxes[name] + spare, budget - (time.time() - start) - reserved)
        if name in args.skip or box < 10:
            results.append(Result(name, "skipped", note="--skip" if name in args.skip else "no time left in budget"))
            continue
        log, t0 = logs / f"{name}.log", time.time()
        print(f"[{time.time() - start:5.0f} s] {name} (time box {box:.0f} s) ...", flush=True)
        if name == "gpu-tests":
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"]
            status = run_command(cmd, log, box, env)
            r = Result(name, status, note=pytest_note(log) or (last_error(log) if status == "failed" else ""))
        elif name == "pipeline-ppo":
            r = pipeline_step(name, ["--until", "ppo"], run, box, log, env, mem, args)
        elif name == "pipeline-dpo":
            r = pipeline_step(name, ["--redo", "dpo", "rl=dpo"], run, box, log, env, mem, args)
        else:
            r = serve_step(box, log, env, args)
        r.seconds, r.peak_gib = round(time.time() - t0, 1), mem.peak(t0, time.time())
        results.append(r)
        spare = max(0.0, box - r.seconds)
        print(f"[{time.time() - start:5.0f} s] {name}: {r.status} {r.note}", flush=True)
    total = time.time() - start
    mem.stop()

    unit = "host" if args.device == "cpu" else "GPU"
    rows = table(results, total, unit)
    source = f"peak memory: {mem.source}, sampled every {mem.every} s; in use before the first step: " + (
        "-" if baseline is None else f"{baseline:.2f} GiB"
    )
    print("\n" + text_table(rows) + "\n" + source)
    ok = all(r.status == "ok" or r.note == "--skip" for r in results)
    report = {
        "device": args.device,
        "machine": where,
        "versions": versions(),
        "budget_s": budget,
        "time_boxes_s": boxes,
        "total_s": round(total, 1),
        "all_ok": ok,
        "memory": {"source": mem.source, "every_s": mem.every, "baseline_gib": baseline},
        "steps": [asdict(r) for r in results],
        "overrides": (CPU_OVERRIDES if args.device == "cpu" else []) + args.overrides,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    head = f"# gpu-smoke ({args.device}) on {where}\n\n{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    (out / "summary.md").write_text(f"{head}, budget {budget:.0f} s\n\n{markdown_table(rows)}\n\n{source}\n")
    if (run / "pipeline.json").exists():
        shutil.copy(run / "pipeline.json", logs / "pipeline.json")
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    print(f"written: {out / 'summary.md'}, {out / 'summary.json'}, {out / 'logs.tgz'}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
