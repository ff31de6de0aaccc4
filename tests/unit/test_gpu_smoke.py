"""`make gpu-smoke`'s own logic on CPU (jobs/bench/gpu_smoke.py): a pipeline step's stage rows
from pipeline.json, the table, and a step's process group ended with everything it started.
The whole script in CPU mode: `python jobs/bench/gpu_smoke.py --device cpu` (~8 min)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "jobs" / "bench" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def test_stage_rows_say_what_ran_was_skipped_timed_out_or_was_not_reached(tmp_path):
    g = _smoke()
    now = time.time()
    stages = {
        "generate": {"status": "finished", "started": _iso(now - 500), "finished": _iso(now - 400), "seconds": 100},
        "sft": {"status": "finished", "started": _iso(now - 50), "finished": _iso(now - 20), "seconds": 30.0},
        "label": {"status": "failed", "started": _iso(now - 20), "failed": _iso(now - 5), "error": "SystemExit: 1"},
    }
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": stages}))
    mem = g.MemorySampler("cpu")
    mem.samples = [(now - 450, 9.0), (now - 30, 3.0), (now - 10, 5.0)]
    rows = g.stage_rows(tmp_path, g.PPO_STAGES, now - 60, "timeout", mem)
    assert [(r.name, r.status) for r in rows] == [
        ("generate", "skipped"),  # finished before this step began
        ("sft", "ok"),
        ("label", "timeout"),  # in progress when the time box ran out (SIGINT: recorded as failed)
        ("rm", "not reached"),
        ("ppo", "not reached"),
    ]
    assert rows[1].seconds == 30.0 and rows[1].peak_gib == 3.0 and rows[2].peak_gib == 5.0
    failed = g.stage_rows(tmp_path, g.PPO_STAGES, now - 60, "failed", mem)
    assert failed[2].status == "failed" and failed[2].note == "SystemExit: 1"
    trace = "WorkerGroupError: Training failed:\nTraceback (most recent call last):\n  File x\nTypeError: 'x' is None"
    assert g.one_line(trace) == "TypeError: 'x' is None"

    text = g.text_table(g.table([g.Result("pipeline-ppo", "timeout", 61.5, 5.0, stages=rows)], 62.0, "GPU"))
    assert text.splitlines()[0].split() == ["step", "result", "seconds", "peak", "GPU", "GiB", "note"]
    assert "  label" in text and "timeout" in text and text.splitlines()[-1].split() == ["total", "62.0", "5.00"]


def test_a_step_that_runs_out_is_stopped_with_its_whole_process_group(tmp_path):
    """The driver ends on SIGINT; its child (a Ray daemon, say) would outlive it: it goes too."""
    g = _smoke()
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    log = tmp_path / "step.log"
    t0 = time.time()
    status = g.run_command([sys.executable, "-c", script], log, 1.0, g.child_env())
    assert status == "timeout" and time.time() - t0 < 40
    assert "process group" in log.read_text() and "[gpu_smoke] timeout" in log.read_text()
    group = int(log.read_text().split("process group ")[1].split(",")[0])
    left = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout.split("\n")
    assert not [x for x in left if x.split() and int(x.split()[0]) == group and not x.split()[1].startswith("Z")]
