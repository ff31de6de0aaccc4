"""RL-CAI labeling throughput: our Ray Data label stage vs. a sequential loop on the same model,
for each engine (hf, vllm).

    python jobs/bench/label_throughput.py                 # ~10 min on 2 cores
    python jobs/bench/label_throughput.py --engines hf --pairs 96 --principles-per-pair 2

Same pairs, same model, same method (both orders, --principles-per-pair principles, the
constitution's few-shot comparison examples); a label is one pair, fully debiased:
  sequential  one comparison (one order, one principle) at a time: the engine's
              choice_logprobs on a single conversation, no batching, no prefix reuse
  in-process  the Labeler (batched, shared few-shot prefix prefilled once) without Ray
  pipeline    `cai-ray label` on a local Ray cluster (Ray Data, labeler actor pool)
The pipeline's share of time in the engine is the labeler actors' time inside their engine
calls over the run's wall time (from the manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cai_ray.config import load_config  # noqa: E402
from cai_ray.core import prompts  # noqa: E402
from cai_ray.core.constitution import load_constitution  # noqa: E402
from cai_ray.core.labeler import Labeler, LabelSettings  # noqa: E402
from cai_ray.label.config import LabelConfig  # noqa: E402

CONSTITUTION = ROOT / "constitutions" / "general.yaml"


def make_pairs(n: int) -> list[dict]:
    """Red-team prompts, each with a careful and a harmful-sounding reply from the gold set."""
    prompts_ = [json.loads(x) for x in (ROOT / "jobs" / "data" / "red_team.jsonl").read_text().splitlines()]
    gold = [json.loads(x) for x in (ROOT / "jobs" / "data" / "gold_pairs.jsonl").read_text().splitlines()]
    rows = []
    for i in range(n):
        p, g = prompts_[i % len(prompts_)], gold[i % len(gold)]
        a, b = (g["chosen"], g["rejected"]) if i % 2 else (g["rejected"], g["chosen"])
        rows.append({"id": f"bench-{i}", "prompt": p["prompt"], "response_a": a, "response_b": b})
    return rows


def make_engine(backend: str, args, batch: int, prefix_cache: bool = True):
    if backend == "vllm":
        from cai_ray.engine.vllm import VLLMEngine

        return VLLMEngine(
            model=args.model, dtype=args.dtype, threads=os.cpu_count(), kv_cache_gb=2, prefix_cache=prefix_cache
        )
    from cai_ray.engine.hf import HFEngine

    return HFEngine(
        model=args.model, dtype=args.dtype, threads=os.cpu_count(), max_batch_size=batch, prefix_cache=prefix_cache
    )


def shutdown(engine) -> None:
    if hasattr(engine, "shutdown"):
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--principles-per-pair", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per labeler call")
    ap.add_argument(
        "--actors", type=int, default=2, help="pipeline labeler actors (each gets cores / actors torch threads)"
    )
    ap.add_argument(
        "--sequential-pairs", type=int, default=12, help="pairs the sequential loop is timed on; its rate is per pair"
    )
    ap.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from cai_ray.runtime import setup_logging

    setup_logging("WARNING")
    results = {e: bench(e, args) for e in args.engines}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def bench(backend: str, args) -> dict:
    rows = make_pairs(args.pairs)
    c = load_constitution(CONSTITUTION)
    settings = LabelSettings(principles_per_pair=args.principles_per_pair)
    threads = os.cpu_count()

    # -- sequential: one comparison per engine call, no batching, no prefix reuse ---------------
    seq_engine = make_engine(backend, args, 1, prefix_cache=False)
    seq = Labeler(seq_engine, c, settings)
    comps = [
        m
        for r in rows[: args.sequential_pairs]
        for _, _, m in seq.comparisons_for(r["id"], [prompts.user(r["prompt"])], r["response_a"], r["response_b"])
    ]
    seq_engine.choice_logprobs([comps[0]], prompts.CHOICES)  # warm-up
    t = time.perf_counter()
    for conv in comps:
        seq_engine.choice_logprobs([conv], prompts.CHOICES)
    seq_s = time.perf_counter() - t
    seq_rate = args.sequential_pairs / seq_s
    shutdown(seq_engine)
    del seq_engine

    # -- in-process batched Labeler, no Ray --------------------------------------------------
    engine = make_engine(backend, args, args.batch_size)
    lab = Labeler(engine, c, settings)
    t = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i : i + args.batch_size]
        lab.label(
            [r["id"] for r in chunk],
            [[prompts.user(r["prompt"])] for r in chunk],
            [r["response_a"] for r in chunk],
            [r["response_b"] for r in chunk],
        )
    raw_s = time.perf_counter() - t
    shutdown(engine)
    del engine, lab

    # -- the pipeline --------------------------------------------------------------------------
    from cai_ray.label.run import label
    from cai_ray.runtime import init_ray

    init_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "pairs.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = load_config(
            LabelConfig,
            None,
            [
                f"input={inp}",
                f"output={tmp}/out",
                f"labeler.model={args.model}",
                f"labeler.dtype={args.dtype}",
                f"labeler.max_batch_size={args.batch_size}",
                f"labeler_pool.batch_size={args.batch_size}",
                f"method.principles_per_pair={args.principles_per_pair}",
                f"labeler_pool.min_actors={args.actors}",
                f"labeler_pool.max_actors={args.actors}",
                f"labeler_pool.cpus_per_actor={int(100 * (os.cpu_count() - 0.25) / args.actors) / 100}",
                f"labeler.backend={backend}",
                *(["labeler.kv_cache_gb=1"] if backend == "vllm" else []),
            ],
        )
        t = time.perf_counter()
        m = label(cfg)
        pipe_s = time.perf_counter() - t
    n = len(rows)
    tm = m["timing"]
    # actors of a pool start together: the wall time their loading costs is one actor's
    # load (the manifest sums them), ~ the mean over the actors started
    load_s = tm["model_load_s"] / max(1, tm["engine_actors_started"])
    res = {
        "engine": backend,
        "pairs": n,
        "model": args.model,
        "dtype": args.dtype,
        "principles_per_pair": args.principles_per_pair,
        "comparisons_per_label": 2 * args.principles_per_pair,
        "batch_size": args.batch_size,
        "pipeline_actors": args.actors,
        "cores": threads,
        "sequential_labels_per_s": seq_rate,
        "in_process_labels_per_s": n / raw_s,
        "pipeline_labels_per_s": n / pipe_s,
        "pipeline_labels_per_s_excl_model_load": n / (pipe_s - load_s),
        "pipeline_vs_sequential": (n / pipe_s) / seq_rate,
        "pipeline_vs_sequential_excl_model_load": (n / (pipe_s - load_s)) / seq_rate,
        "pipeline_vs_in_process": raw_s / pipe_s,
        "engine_share_of_wall": tm.get("labeler_busy_share"),
        "model_load_s": load_s,
        "sequential_measured_on_pairs": args.sequential_pairs,
    }
    print(
        f"\n[labels, engine {backend}] {n} pairs, {args.model} {args.dtype}, both orders x {args.principles_per_pair} "
        f"principle(s) = {2 * args.principles_per_pair} comparisons per label, batch {args.batch_size}, "
        f"{args.actors} pipeline actor(s), {threads} cores"
    )
    print(
        f"  sequential loop   : {seq_rate:.3f} labels/s (one comparison per call; timed on "
        f"{args.sequential_pairs} pairs = {len(comps)} comparisons)"
    )
    print(f"  in-process Labeler: {n / raw_s:.3f} labels/s (batched, shared prefix, no Ray)")
    print(
        f"  cai-ray pipeline  : {n / pipe_s:.3f} labels/s end to end (incl. ~{load_s:.1f} s actor start + "
        f"model load, actors loading in parallel), {res['pipeline_labels_per_s_excl_model_load']:.3f} excl. model load"
    )
    print(
        f"  ratio pipeline / sequential : {res['pipeline_vs_sequential']:.1f}x end to end, "
        f"{res['pipeline_vs_sequential_excl_model_load']:.1f}x excl. model load   (target >= 6)"
    )
    print(f"  ratio pipeline / in-process : {res['pipeline_vs_in_process']:.2f}")
    print(f"  share of pipeline wall time in the engine: {res['engine_share_of_wall']}", flush=True)
    return res


if __name__ == "__main__":
    main()
