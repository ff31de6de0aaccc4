"""Eval throughput on Ray Data: rows/s of the answer and judge stages with 1 vs 2 engine
actors per pool, on a real model and on the benchmark-only noop engine (orchestration alone).

    python jobs/bench/eval_throughput.py                       # ~6 min on 2 cores
    python jobs/bench/eval_throughput.py --parts noop --noop-prompts 5000

Each run is a whole `cai-ray eval` (evaluate()) into a fresh folder, one evaluated model:
  answers     one row per prompt (red-team + benign): the model's answer
  judgements  one row per answer: P(harmful) / P(refuses) asked in both option orders
A row/s figure is the stage's rows over its Ray Data wall time (engine start included; the
actors' summed model load is shown beside it). ``model`` = SmolLM2-135M on hf (bf16), also the
judge; ``noop`` = the benchmark engine (no model: read → ids → prompts → write, the cost of
the stage machinery itself). On 2 cores two actors share the same cores (each gets one torch
thread instead of two): the figure says what Ray Data's pool costs or gains here, not a
cluster's scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cai_ray.config import load_config  # noqa: E402
from cai_ray.eval.config import EvalConfig  # noqa: E402


def write_sets(folder: Path, n: int) -> tuple[Path, Path]:
    """n red-team and n benign prompts (the bundled ones, repeated with distinct ids and a
    numbered suffix so no two prompts are the same)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, src in (("harmful", "red_team.jsonl"), ("benign", "benign.jsonl")):
        rows = [json.loads(x) for x in (ROOT / "jobs" / "data" / src).read_text().splitlines()]
        path = folder / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                r = rows[i % len(rows)]
                text = r["prompt"] if i < len(rows) else f"{r['prompt']} (variant {i})"
                f.write(json.dumps({"id": f"{name}-{i}", "prompt": text, "category": r.get("category")}) + "\n")
        out.append(path)
    return out[0], out[1]


def run_eval(part: str, actors: int, n: int, args, work: Path) -> dict:
    from cai_ray.eval.run import evaluate

    harmful, benign = write_sets(work / "data", n)
    output = work / f"{part}-{actors}"
    shutil.rmtree(output, ignore_errors=True)
    engine = "noop" if part == "noop" else "hf"
    model = "noop" if part == "noop" else args.model
    pool = f"{{min_actors: {actors}, max_actors: {actors}, cpus_per_actor: {args.cpus_per_actor}, batch_size: {args.batch_size}}}"
    cfg = load_config(
        EvalConfig,
        None,
        [
            f"models=[m={model}]",
            f"harmful={harmful}",
            f"benign={benign}",
            f"output={output}",
            f"engine.backend={engine}",
            f"judge.backend={engine}",
            f"judge.model={model}",
            f"engine.dtype={args.dtype}",
            f"judge.dtype={args.dtype}",
            f"sampling.max_new_tokens={args.max_new_tokens}",
            "few_shot=0",
            f"pool={pool}",
            f"judge_pool={pool}",
            "bootstrap=10",
            "bootstrap_elo=10",
        ],
    )
    t0 = time.perf_counter()
    manifest = evaluate(cfg)
    wall = time.perf_counter() - t0
    row = {"part": part, "actors": actors, "prompts": 2 * n, "eval_wall_s": round(wall, 1)}
    for stage, key in (("answers", "answers:m"), ("judgements", "judgements")):
        s = manifest["timing"]["stages"][key]
        sub = json.loads((output / ("answers/m" if stage == "answers" else "judgements") / "manifest.json").read_text())
        row[stage] = {
            "rows": s["written"],
            "wall_s": s["wall_s"],
            "rows_per_s": round(s["written"] / s["wall_s"], 2),
            "model_load_s": sub["timing"]["model_load_s"],
            "engine_s": sub["timing"]["engine_s"],
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["model", "noop"], choices=["model", "noop"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=24, help="red-team and as many benign prompts (model part)")
    ap.add_argument("--noop-prompts", type=int, default=2000, help="red-team and as many benign prompts (noop part)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per engine actor task")
    ap.add_argument("--cpus-per-actor", type=float, default=0.8, help="two actors + the read task fit in 2 cores")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import ray

    from cai_ray import runtime

    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    runtime.init_ray(None)
    rows = []
    try:
        for part in args.parts:
            n = args.prompts if part == "model" else args.noop_prompts
            for actors in (1, 2):
                rows.append(run_eval(part, actors, n, args, work))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'part':6} {'actors':>6} {'prompts':>7}  {'answers rows/s':>14} {'judge rows/s':>12} {'eval wall s':>11}")
    for r in rows:
        print(
            f"{r['part']:6} {r['actors']:>6} {r['prompts']:>7}  {r['answers']['rows_per_s']:>14} "
            f"{r['judgements']['rows_per_s']:>12} {r['eval_wall_s']:>11}"
        )
    for part in args.parts:
        one, two = (next(r for r in rows if r["part"] == part and r["actors"] == k) for k in (1, 2))
        for stage in ("answers", "judgements"):
            ratio = two[stage]["rows_per_s"] / one[stage]["rows_per_s"]
            print(f"{part}: {stage} 2 actors / 1 actor = {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
