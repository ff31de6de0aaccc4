"""Training overhead: `cai-ray train sft` on Ray Train vs. the same TRL SFTTrainer run directly.

    python jobs/bench/train_overhead.py                    # ~5 min on 2 cores (SmolLM2-135M)
    python jobs/bench/train_overhead.py --model tiny-random --steps 20

Same rows (the bundled helpfulness set, repeated), same model, same ZeRO stage, same
per-worker batch, same number of optimizer steps, side by side in one run:
  direct      sft.build() → SFTTrainer.train() in one plain process (world size 1, DeepSpeed
              initialised in-process), every core for its torch threads
  ray 1       `train_sft` with 1 Ray Train worker holding every core
  ray 2       `train_sft` with 2 workers, one core each (data parallel, gloo all-reduce)
samples/s is the Trainer's own figure (samples over its train loop), so the ratio isolates
what Ray Train adds to the loop (reporting, checkpoint hand-off); end-to-end wall times,
which add Ray start-up, worker-group creation and model loading, are printed beside it.
Target: ray 1 / direct >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def rows_file(folder: Path, n: int) -> Path:
    src = (ROOT / "jobs" / "data" / "helpful.jsonl").read_text().splitlines()
    path = folder / "sft.jsonl"
    lines = []
    for i in range(n):
        r = json.loads(src[i % len(src)])
        r["id"] = f"bench-{i}"
        lines.append(json.dumps(r))
    path.write_text("\n".join(lines) + "\n")
    return path


def overrides(args, data: Path, out: Path, workers: int, cpus: float) -> list[str]:
    return [
        f"data={data}",
        f"output={out}",
        f"model={args.model}",
        f"zero={args.zero}",
        f"scaling.workers={workers}",
        f"scaling.cpus_per_worker={cpus}",
        f"optim.max_steps={args.steps}",
        f"optim.per_worker_batch_size={args.batch}",
        f"optim.max_length={args.max_length}",
        "optim.learning_rate=1e-5",
        f"checkpoint.every_steps={args.steps}",
        "checkpoint.keep=1",
    ]


def direct(args, data: Path, out: Path) -> dict:
    """The worker's SFTTrainer in this process alone (run in a subprocess by main)."""
    from cai_ray.batch.readers import load_rows
    from cai_ray.config import load_config
    from cai_ray.train import sft
    from cai_ray.train.config import SFTTrainConfig
    from cai_ray.train.data import sft_row
    from cai_ray.train.harness import WorkerJob

    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }.items():
        os.environ[k] = v
    cfg = load_config(SFTTrainConfig, None, overrides(args, data, out, 1, os.cpu_count()))
    rows, _ = load_rows(str(data), sft_row)
    job = WorkerJob("sft", cfg, tuple(rows), str(out), use_gpu=False, base_dir=os.getcwd())
    t0 = time.perf_counter()
    trainer = sft.build(job, out / "_work")
    result = trainer.train()
    wall = time.perf_counter() - t0
    return {
        "samples_per_second": result.metrics["train_samples_per_second"],
        "wall_s": wall,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
    }


def on_ray(args, data: Path, out: Path, workers: int, cpus: float) -> dict:
    from cai_ray.config import load_config
    from cai_ray.train.config import SFTTrainConfig
    from cai_ray.train.sft import train_sft

    t0 = time.perf_counter()
    m = train_sft(load_config(SFTTrainConfig, None, overrides(args, data, out, workers, cpus)))
    return {
        "samples_per_second": m["metrics"]["samples_per_second"],
        "wall_s": time.perf_counter() - t0,
        "global_step": m["metrics"]["global_step"],
        "train_loss": m["metrics"]["train_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=4, help="rows per worker per step")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--direct-only", metavar="OUT_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.direct_only:  # the subprocess: one plain process, no Ray
        work = Path(args.workdir)
        res = direct(args, work / "sft.jsonl", work / "direct")
        Path(args.direct_only).write_text(json.dumps(res))
        return

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cai-bench-train-") as tmp:
        work = Path(tmp)
        data = rows_file(work, args.rows)
        print(
            f"model {args.model}, ZeRO-{args.zero}, {args.steps} steps x {args.batch} rows/worker, "
            f"max_length {args.max_length}, {cores} cores",
            flush=True,
        )
        res_file = work / "direct.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--direct-only",
                str(res_file),
                "--workdir",
                str(work),
                "--model",
                args.model,
                "--zero",
                str(args.zero),
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--max-length",
                str(args.max_length),
            ],
            check=True,
            env=env,
        )
        results = {"direct": json.loads(res_file.read_text())}
        print(f"direct: {results['direct']}", flush=True)

        from cai_ray.runtime import init_ray

        init_ray(None)
        results["ray_1_worker"] = on_ray(args, data, work / "ray1", 1, float(cores))
        print(f"ray 1 worker: {results['ray_1_worker']}", flush=True)
        if cores >= 2:
            results["ray_2_workers"] = on_ray(args, data, work / "ray2", 2, float(cores // 2))
            print(f"ray 2 workers: {results['ray_2_workers']}", flush=True)

    d, r1 = results["direct"], results["ray_1_worker"]
    summary = {
        "ray1_vs_direct_samples_per_s": round(r1["samples_per_second"] / d["samples_per_second"], 3),
        "ray1_vs_direct_end_to_end": round(d["wall_s"] / r1["wall_s"], 3),
    }
    if "ray_2_workers" in results:
        r2 = results["ray_2_workers"]
        summary["ray2_vs_ray1_samples_per_s"] = round(r2["samples_per_second"] / r1["samples_per_second"], 3)
    print("\n| run | samples/s (train loop) | wall s (end to end) | final loss |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['samples_per_second']:.2f} | {r['wall_s']:.1f} | {r['train_loss']:.3f} |")
    print(json.dumps({"config": vars(args), "results": results, "summary": summary}))


if __name__ == "__main__":
    main()
