"""Chaos: the SL-CAI and label stages over thousands of prompts while engine actors are
SIGKILLed every few seconds and the driver itself is killed once (then the same command is
run again, as an operator would). Printed per stage: rows read = written + rejected,
duplicates, missing, kills survived, and the time against a clean run of the same input.

    python jobs/bench/chaos.py                      # 2,000 prompts per stage, ~15 min on 2 cores
    python jobs/bench/chaos.py --prompts 500 --stages sl --every 4

Each run is a real `cai-ray generate` / `cai-ray label` subprocess (its own local Ray
cluster, tiny-random model). The killer picks a random engine actor process (ray::...SLWorker
or LabelWorker) every --every seconds. Once about a third of the output is written it
SIGKILLs the driver instead; the Ray processes the dead driver leaves behind are stopped
(`ray stop --force`: this benchmark owns the machine) and the command is run again, with the
killer still at work, until it finishes. The input holds --bad malformed rows as well.

    python jobs/bench/chaos.py --nodes 2 --stages sl --prompts 200       # a worker node lost mid-run
    python jobs/bench/chaos.py --nodes 2 --stages label --prompts 1000   # labels are quicker: more rows

With ``--nodes 2`` the stage runs on two Ray nodes of this machine (tests/support/nodes.py: a
token-authenticated head and a worker node with its own CPUs, temp dir, TMPDIR and model
cache), with one engine actor per node. Once the worker node's actor is up and the first rows
are written, the worker node is lost: its raylet, object store and every process it started
are SIGKILLed at once (a machine losing power). The job goes on on the head alone. Printed:
the same exactly-once figures, and the time against a clean run on the same two nodes. A run
whose rows were all written before the worker node's actor was up is refused (give it more
rows). Only this benchmark's own Ray processes are stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ACTOR = {"sl": "SLWorker", "label": "LabelWorker"}


def write_input(path: Path, stage: str, n: int, bad: int) -> int:
    """n good rows (prompts, or ready-made pairs for the label stage) and ``bad`` broken ones;
    returns the number of input lines."""
    lines = []
    for i in range(n):
        row = {"id": f"r{i}", "prompt": f"Question {i}: how do I keep my accounts safe online?"}
        if stage == "label":
            row.update(response_a=f"Use a password manager ({i}).", response_b=f"Reuse one password everywhere ({i}).")
        lines.append(json.dumps(row))
    for i in range(bad):
        lines.append(['{"prompt": ""}', "{not json", '{"prompt": 5}', '{"prompt": "x\\ud800"}'][i % 4])
    random.Random(0).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def command(stage: str, inp: Path, out: Path) -> list[str]:
    cli = [sys.executable, "-m", "cai_ray.cli"]
    if stage == "sl":
        return [
            *cli,
            "generate",
            "--input",
            str(inp),
            "--output",
            str(out),
            "--model",
            "tiny-random",
            "--revisions",
            "1",
            "--max-new-tokens",
            "8",
            "--actors",
            "2,2",
            "--batch-size",
            "16",
            "engine.dtype=float32",
            "pool.cpus_per_actor=0.5",
            "outputs.rows_per_file=64",
        ]
    return [
        *cli,
        "label",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--labeler",
        "tiny-random",
        "labeler.dtype=float32",
        "labeler_pool.min_actors=2",
        "labeler_pool.max_actors=2",
        "labeler_pool.cpus_per_actor=0.5",
        "labeler_pool.batch_size=16",
        "outputs.rows_per_file=64",
    ]


def actor_pids(name: str) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and name in cmd:
            out.append(p.info["pid"])
    return out


def rows_written(out: Path) -> int:
    import pyarrow.parquet as pq

    total = 0
    for folder in ("data", "filtered"):
        for f in (out / folder).glob("part-*.parquet") if (out / folder).exists() else []:
            try:
                total += pq.ParquetFile(f).metadata.num_rows
            except Exception:  # a part being renamed into place
                pass
    return total


def ray_stop() -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def run_clean(stage: str, inp: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run(command(stage, inp, out), check=True, capture_output=True, timeout=3600)
    ray_stop()
    return time.perf_counter() - t


def run_chaos(stage: str, inp: Path, out: Path, n_good: int, every: float) -> dict:
    kills = {"actors": 0, "driver": 0}
    stop = threading.Event()
    driver: dict = {}
    rng = random.Random(1)

    def killer():
        while not stop.wait(every * rng.uniform(0.5, 1.5)):
            proc = driver.get("proc")
            if kills["driver"] == 0 and proc is not None and rows_written(out) >= n_good // 3:
                proc.send_signal(signal.SIGKILL)
                kills["driver"] += 1
                continue
            pids = actor_pids(ACTOR[stage])
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills["actors"] += 1
                except ProcessLookupError:
                    pass

    t0 = time.perf_counter()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    attempts = 0
    try:
        while True:
            attempts += 1
            with open(out.parent / f"{stage}-chaos-{attempts}.log", "w") as log:
                driver["proc"] = subprocess.Popen(command(stage, inp, out), stdout=log, stderr=subprocess.STDOUT)
                rc = driver["proc"].wait(timeout=3600)
            driver["proc"] = None
            ray_stop()
            if rc == 0:
                break
            if attempts >= 8:
                raise RuntimeError(f"{stage}: still failing after {attempts} runs (rc {rc}); see {log.name}")
    finally:
        stop.set()
        thread.join()
    return {"wall_s": time.perf_counter() - t0, "runs": attempts, "kills": kills}


def run_two_nodes(stage: str, inp: Path, tmp: Path, n_good: int) -> dict:
    """A clean run and a run that loses the worker node, on the same head + worker node."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.nodes import TwoNodes

    nodes = TwoNodes()
    try:
        nodes.up()
        nodes.on_worker_node("tiny-random")  # its own model cache, built before either run is timed
        join = [f"ray_address={nodes.address}"]
        t = time.perf_counter()
        clean = subprocess.run(
            command(stage, inp, tmp / f"{stage}-2n-clean") + join,
            env=nodes.env,
            capture_output=True,
            text=True,
            timeout=3600,
            cwd=ROOT,
        )
        if clean.returncode != 0:
            raise RuntimeError(f"{stage}: the clean two-node run failed: {clean.stderr[-3000:]}")
        clean_s = time.perf_counter() - t
        out = tmp / f"{stage}-2n-lost"
        log = tmp / f"{stage}-2n-lost.log"
        lost = nodes.lose_worker_mid_run(
            command(stage, inp, out) + join, ACTOR[stage], lambda: rows_written(out), n_good, log, ROOT
        )
        if lost["rc"] != 0:
            raise RuntimeError(f"{stage}: the run that lost the worker node failed: {log.read_text()[-3000:]}")
        seen = lost["seen"]
        mine = [a for a in seen if ACTOR[stage] in a["class"]]
        on_worker = {a["id"] for a in mine if a["node"] == "worker" and a["state"] == "ALIVE"}
        return {
            "clean_wall_s": clean_s,
            "wall_s": lost["wall_s"],
            "killed_at_s": lost["killed_at_s"],
            "rows_at_kill": lost["rows_at_kill"],
            # the worker node's engine actor: restarted by Ray, and up again on the head before the end
            "worker_actor_restarted": any(a["id"] in on_worker and a["state"] == "RESTARTING" for a in mine),
            "worker_actor_back_on_head": any(
                a["id"] in on_worker and a["state"] == "ALIVE" and a["node"] == "head" for a in mine
            ),
            "ledger_on_head": all(a["node"] == "head" for a in seen if a["class"] == "Ledger"),
        }
    finally:
        nodes.down()


def check(stage: str, out: Path, input_lines: int) -> dict:
    from cai_ray.batch.stage import read_output

    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    table = read_output(out, ["prompt_id" if stage == "label" else "id"], ("data", "filtered"))
    ids = table.column(0).to_pylist()
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return {
        "input_lines": input_lines,
        "read": c["read"],
        "written": c["written"],
        "rejected": c["rejected"],
        "accounted": c["read"] == c["written"] + c["rejected"] == input_lines,
        "duplicates": len(ids) - len(set(ids)),
        "missing": input_lines - len(set(ids)) - len(rejects),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--bad", type=int, default=40, help="malformed rows mixed into the input")
    ap.add_argument("--every", type=float, default=6.0, help="seconds between kills (randomised ±50%%)")
    ap.add_argument("--stages", nargs="+", choices=["sl", "label"], default=["sl", "label"])
    ap.add_argument("--nodes", type=int, choices=[1, 2], default=1, help="2 = lose a worker node mid-run (above)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            inp = Path(tmp) / f"{stage}.jsonl"
            lines = write_input(inp, stage, args.prompts, args.bad)
            if args.nodes == 2:
                lost = run_two_nodes(stage, inp, Path(tmp), args.prompts)
                res = {**check(stage, Path(tmp) / f"{stage}-2n-lost", lines), **lost}
                res["lost_vs_clean_time"] = lost["wall_s"] / lost["clean_wall_s"]
                results[stage] = res
                print(
                    f"[chaos {stage}, 2 nodes] {lines} input rows ({args.bad} malformed): read {res['read']} = "
                    f"written {res['written']} + rejected {res['rejected']}: {'yes' if res['accounted'] else 'NO'}; "
                    f"duplicates {res['duplicates']}, missing {res['missing']}; worker node lost "
                    f"{lost['killed_at_s']:.0f} s into the run ({lost['rows_at_kill']} rows written); its engine "
                    f"actor restarted: {'yes' if lost['worker_actor_restarted'] else 'no'}, seen up again on the head "
                    f"before the end (1 s polls): {'yes' if lost['worker_actor_back_on_head'] else 'no'}; ledger on the head: "
                    f"{'yes' if lost['ledger_on_head'] else 'NO'}; {lost['wall_s']:.0f} s vs "
                    f"{lost['clean_wall_s']:.0f} s clean on two nodes ({res['lost_vs_clean_time']:.2f}x)",
                    flush=True,
                )
                continue
            clean_s = run_clean(stage, inp, Path(tmp) / f"{stage}-clean")
            chaos = run_chaos(stage, inp, Path(tmp) / f"{stage}-chaos", args.prompts, args.every)
            res = {**check(stage, Path(tmp) / f"{stage}-chaos", lines), **chaos, "clean_wall_s": clean_s}
            res["chaos_vs_clean_time"] = chaos["wall_s"] / clean_s
            results[stage] = res
            print(
                f"[chaos {stage}] {lines} input rows ({args.bad} malformed): read {res['read']} = written "
                f"{res['written']} + rejected {res['rejected']}: {'yes' if res['accounted'] else 'NO'}; "
                f"duplicates {res['duplicates']}, missing {res['missing']}; survived {chaos['kills']['actors']} "
                f"engine-actor kills and {chaos['kills']['driver']} driver kill ({chaos['runs']} runs of the "
                f"command); {chaos['wall_s']:.0f} s vs {clean_s:.0f} s clean ({res['chaos_vs_clean_time']:.2f}x)",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
