"""SL-CAI throughput: our Ray Data pipeline vs. a sequential loop vs. the raw engine, per
engine (hf, vllm); vLLM's per-row async chains vs. its lock-step batches; the orchestration
alone at a million rows.

    python jobs/bench/sl_throughput.py                    # everything (~25 min on 2 cores)
    python jobs/bench/sl_throughput.py --part model --engines hf vllm
    python jobs/bench/sl_throughput.py --part async       # vLLM: async chains vs batched
    python jobs/bench/sl_throughput.py --part orchestration --rows 1000000

Part "model" (same prompts, same model, same token budget: every generation is forced to
exactly --max-new-tokens tokens, greedy), for each of --engines:
  sequential  one prompt at a time: answer, critique, revise (what a notebook would do)
  raw engine  the engine's batched generate on the same batches, in-process, no Ray
  pipeline    `cai-ray generate` on a local Ray cluster (Ray Data, engine actor pool)
Part "async" (vLLM): `cai-ray generate` with --async-revisions revisions and sampled answers
(temperature 1, no minimum length, so lengths vary), once with every row's chain its own
request stream on vLLM's async engine (async_chains=true) and once in lock-step batches
(async_chains=false), side by side.
Part "orchestration": read → validate/id → prompt building → write, with the
benchmark-only `noop` engine, at 100k and --rows rows; peak PSS of the whole process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cai_ray.config import load_config  # noqa: E402
from cai_ray.core import prompts  # noqa: E402
from cai_ray.core.constitution import load_constitution  # noqa: E402
from cai_ray.engine import Sampling  # noqa: E402
from cai_ray.generate.config import GenerateConfig  # noqa: E402

CONSTITUTION = ROOT / "constitutions" / "general.yaml"


class PeakMemory:
    """Samples the PSS of this process and all its descendants (the local Ray cluster)."""

    def __init__(self, every: float = 1.0):
        import psutil

        self.psutil, self.every, self.peak, self.at_peak, self.timeline = psutil, every, 0, {}, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[str, int]:
        # /proc/PID/smaps_rollup is the kernel's own PSS sum: far cheaper than psutil's
        # memory_full_info, which parses every mapping and would steal CPU from the run.
        me = self.psutil.Process()
        out: dict[str, int] = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                with open(f"/proc/{p.pid}/smaps_rollup") as fh:
                    pss = next(int(x.split()[1]) * 1024 for x in fh if x.startswith("Pss:"))
                name = " ".join(p.cmdline())[:48] or p.name()
            except (OSError, StopIteration, self.psutil.Error):
                continue
            out[f"{p.pid} {name}"] = pss
        return out

    def _run(self):
        while not self._stop.is_set():
            sample = self._sample()
            total = sum(sample.values())
            self.timeline.append(total)
            if total > self.peak:
                self.peak, self.at_peak = total, sample
            self._stop.wait(self.every)

    def top(self, n: int = 5) -> str:
        items = sorted(self.at_peak.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{name.split(' ', 1)[1]} {gib(v)}" for name, v in items)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# -- part 1: with the model -----------------------------------------------------------------
def make_engine(name: str, args):
    if name == "vllm":
        from cai_ray.engine.vllm import VLLMEngine

        return VLLMEngine(model=args.model, dtype=args.dtype, threads=os.cpu_count(), kv_cache_gb=2)
    from cai_ray.engine.hf import HFEngine

    return HFEngine(model=args.model, dtype=args.dtype, threads=os.cpu_count(), max_batch_size=args.batch_size)


def bench_model(args, backend: str) -> dict:
    lines = (ROOT / "jobs" / "data" / "red_team.jsonl").read_text().splitlines()[: args.prompts]
    rows = [json.loads(x) for x in lines]
    c = load_constitution(CONSTITUTION)
    shots = prompts.few_shot_turns(c, None)
    p = Sampling(temperature=0, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, seed=0)
    tokens_per_prompt = 3 * args.max_new_tokens
    engine = make_engine(backend, args)

    def chain(batch):  # answer → critique → revise for a list of rows, batched
        convs = [[prompts.user(r["prompt"])] for r in batch]
        principles = [c.sample(r["id"], 1, 0)[0] for r in batch]
        answers = engine.generate(convs, p)
        crits = engine.generate(
            [prompts.critique_messages(shots, cv, a, pr) for cv, a, pr in zip(convs, answers, principles)], p
        )
        engine.generate(
            [prompts.revision_messages(shots, cv, a, pr, k) for cv, a, pr, k in zip(convs, answers, principles, crits)],
            p,
        )

    chain(rows[:1])  # warm-up
    t = time.perf_counter()
    for r in rows[: args.sequential_prompts]:
        chain([r])
    seq_s = (time.perf_counter() - t) / args.sequential_prompts * len(rows)

    t = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        chain(rows[i : i + args.batch_size])
    raw_s = time.perf_counter() - t
    if hasattr(engine, "shutdown"):
        engine.shutdown()

    from cai_ray.generate.run import generate
    from cai_ray.runtime import init_ray

    init_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "p.jsonl"
        inp.write_text("\n".join(lines) + "\n")
        cfg = load_config(
            GenerateConfig,
            None,
            [
                f"input={inp}",
                f"output={tmp}/out",
                f"engine.model={args.model}",
                f"engine.dtype={args.dtype}",
                "revisions=1",
                "sampling.temperature=0",
                f"sampling.max_new_tokens={args.max_new_tokens}",
                f"sampling.min_new_tokens={args.max_new_tokens}",
                f"pool.batch_size={args.batch_size}",
                f"engine.max_batch_size={args.batch_size}",
                "seed=0",
                f"engine.backend={backend}",
                *(["engine.kv_cache_gb=2"] if backend == "vllm" else []),
            ],
        )
        t = time.perf_counter()
        m = generate(cfg)
        pipe_s = time.perf_counter() - t
    load_s = m["timing"]["model_load_s"]
    n = len(rows)
    res = {
        "engine": backend,
        "prompts": n,
        "model": args.model,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "sequential_prompts_per_s": n / seq_s,
        "pipeline_prompts_per_s": n / pipe_s,
        "pipeline_vs_sequential": seq_s / pipe_s,
        "raw_engine_tokens_per_s": n * tokens_per_prompt / raw_s,
        "pipeline_tokens_per_s": n * tokens_per_prompt / pipe_s,
        "pipeline_tokens_per_s_excl_model_load": n * tokens_per_prompt / (pipe_s - load_s),
        "pipeline_vs_raw_engine": raw_s / pipe_s,
        "pipeline_vs_raw_engine_excl_model_load": raw_s / (pipe_s - load_s),
        "pipeline_model_load_s": load_s,
        "sequential_measured_on": args.sequential_prompts,
    }
    print(
        f"\n[model, engine {backend}] {n} prompts, {args.model} {args.dtype}, 1 revision, {args.max_new_tokens} tokens "
        f"per generation (3 per prompt), batch {args.batch_size}"
    )
    print(
        f"  sequential loop  : {res['sequential_prompts_per_s']:.3f} prompts/s "
        f"(timed on {args.sequential_prompts} prompts)"
    )
    print(
        f"  cai-ray pipeline : {res['pipeline_prompts_per_s']:.3f} prompts/s "
        f"(end to end, incl. {load_s:.1f} s actor start + model load)"
    )
    print(f"  ratio pipeline / sequential        : {res['pipeline_vs_sequential']:.1f}x   (target >= 6)")
    print(f"  raw engine batched : {res['raw_engine_tokens_per_s']:.1f} generated tokens/s")
    print(
        f"  pipeline           : {res['pipeline_tokens_per_s']:.1f} tokens/s end to end, "
        f"{res['pipeline_tokens_per_s_excl_model_load']:.1f} excl. model load"
    )
    print(
        f"  ratio pipeline / raw engine        : {res['pipeline_vs_raw_engine']:.2f} end to end, "
        f"{res['pipeline_vs_raw_engine_excl_model_load']:.2f} excl. model load   (target >= 0.8)"
    )
    return res


# -- part 2: vLLM async chains vs lock-step batches ----------------------------------------
def bench_async(args) -> dict:
    from cai_ray.generate.run import generate
    from cai_ray.runtime import init_ray

    init_ray(None)
    lines = (ROOT / "jobs" / "data" / "red_team.jsonl").read_text().splitlines()[: args.async_prompts]
    res: dict = {
        "prompts": len(lines),
        "model": args.model,
        "revisions": args.async_revisions,
        "max_new_tokens": args.async_max_new_tokens,
        "batch_size": args.batch_size,
    }
    for mode in ("false", "true"):
        with tempfile.TemporaryDirectory() as tmp:
            inp = Path(tmp) / "p.jsonl"
            inp.write_text("\n".join(lines) + "\n")
            cfg = load_config(
                GenerateConfig,
                None,
                [
                    f"input={inp}",
                    f"output={tmp}/out",
                    f"engine.model={args.model}",
                    f"engine.dtype={args.dtype}",
                    "engine.backend=vllm",
                    "engine.kv_cache_gb=2",
                    f"revisions={args.async_revisions}",
                    "sampling.temperature=1.0",
                    f"sampling.max_new_tokens={args.async_max_new_tokens}",
                    f"pool.batch_size={args.batch_size}",
                    "seed=0",
                    f"async_chains={mode}",
                ],
            )
            t = time.perf_counter()
            m = generate(cfg)
            wall = time.perf_counter() - t
            from cai_ray.batch.stage import read_output

            lengths = [
                len(x or "") for x in read_output(Path(tmp) / "out", ["init_response"])["init_response"].to_pylist()
            ]
        tm = m["timing"]
        key = "async" if mode == "true" else "batched"
        busy = wall - tm["model_load_s"]
        res[key] = {
            "wall_s": round(wall, 2),
            "model_load_s": tm["model_load_s"],
            "rows_per_s": round(len(lines) / wall, 4),
            "rows_per_s_excl_model_load": round(len(lines) / busy, 4),
            "tokens_generated": tm["tokens_generated"],
            "tokens_per_s_excl_model_load": round(tm["tokens_generated"] / busy, 1),
            "answer_chars_min_max": [min(lengths), max(lengths)] if lengths else None,
        }
        r = res[key]
        print(
            f"  {key:8s}: {r['rows_per_s']:.3f} rows/s end to end, {r['rows_per_s_excl_model_load']:.3f} excl. "
            f"{tm['model_load_s']:.0f} s model load; {r['tokens_per_s_excl_model_load']:.1f} tokens/s "
            f"({tm['tokens_generated']} tokens; first answers {r['answer_chars_min_max']} chars)",
            flush=True,
        )
    a, b = res["async"], res["batched"]
    res["async_vs_batched_rows"] = round(a["rows_per_s_excl_model_load"] / b["rows_per_s_excl_model_load"], 2)
    res["async_vs_batched_tokens"] = round(a["tokens_per_s_excl_model_load"] / b["tokens_per_s_excl_model_load"], 2)
    print(
        f"  async / batched: {res['async_vs_batched_rows']:.2f}x rows/s, {res['async_vs_batched_tokens']:.2f}x "
        f"tokens/s (excl. model load)   (target >= 1.3x rows/s)"
    )
    return res


# -- part 3: orchestration alone ------------------------------------------------------------
def write_prompts(folder: Path, rows: int, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    filler = "Please explain in detail how the following everyday situation should be handled safely: "
    per = rows // shards
    for s in range(shards):
        with open(folder / f"shard-{s:03d}.jsonl", "w") as fh:
            base = s * per
            fh.writelines(
                json.dumps({"prompt": f"{filler}case {base + i} of {rows}, variant {(base + i) % 97}."}) + "\n"
                for i in range(per if s < shards - 1 else rows - base)
            )


def bench_orchestration(rows: int, args) -> dict:
    from cai_ray.generate.run import generate
    from cai_ray.runtime import init_ray

    init_ray(None)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        write_prompts(Path(tmp) / "in", rows, args.shards)
        cfg = load_config(
            GenerateConfig,
            None,
            [
                f"input={tmp}/in",
                f"output={tmp}/out",
                "engine.backend=noop",
                "engine.model=noop",
                "revisions=1",
                f"pool.batch_size={args.orch_batch}",
                "pool.min_actors=2",
                "pool.max_actors=2",
                "pool.cpus_per_actor=0.5",
                "pool.task_cpus=0.25",
                "outputs.rows_per_file=50000",
                f"pool.object_store_gb={args.object_store_gb}",
            ],
        )
        with PeakMemory() as mem:
            t = time.perf_counter()
            m = generate(cfg)
            wall = time.perf_counter() - t
    assert m["counts"]["written"] == rows, m["counts"]
    q = len(mem.timeline)
    quarters = [max(mem.timeline[: max(1, q * k // 4)]) for k in (1, 2, 3, 4)]
    res = {
        "rows": rows,
        "wall_s": wall,
        "rows_per_s": rows / wall,
        "peak_pss_bytes": mem.peak,
        "peak_by_quarter_bytes": quarters,
    }
    print(f"  {rows:>9,} rows: {rows / wall:>9,.0f} rows/s ({wall:.1f} s), peak memory {gib(mem.peak)}")
    print(f"      peak so far after each quarter of the run: {', '.join(gib(x) for x in quarters)}")
    print(f"      largest processes at the peak: {mem.top()}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "model", "async", "orchestration"], default="all")
    ap.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    ap.add_argument("--async-prompts", type=int, default=32)
    ap.add_argument("--async-revisions", type=int, default=4)
    ap.add_argument("--async-max-new-tokens", type=int, default=96)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument(
        "--sequential-prompts",
        type=int,
        default=4,
        help="prompts the (slow) sequential loop is timed on; its rate is per prompt",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--orch-batch", type=int, default=8192)
    ap.add_argument(
        "--object-store-gb",
        type=float,
        default=1.0,
        help="Ray Data object-store cap for the orchestration run (bounds memory)",
    )
    ap.add_argument("--tmp", default=None, help="scratch folder for the million-row files")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from cai_ray.runtime import setup_logging

    setup_logging("WARNING")
    results: dict = {}
    if args.part in ("all", "model"):
        results["model"] = {e: bench_model(args, e) for e in args.engines}
    if args.part in ("all", "async"):
        print(
            f"\n[async] vLLM, {args.async_prompts} prompts, {args.async_revisions} revisions, sampled "
            f"(temperature 1, <= {args.async_max_new_tokens} tokens), batch {args.batch_size}"
        )
        results["async"] = bench_async(args)
    if args.part in ("all", "orchestration"):
        print("\n[orchestration] read → validate/id → prompt building → write, noop engine (benchmark only)")
        small = bench_orchestration(min(100_000, args.rows), args)
        big = bench_orchestration(args.rows, args) if args.rows > 100_000 else small
        growth = big["peak_pss_bytes"] / small["peak_pss_bytes"]
        print(
            f"  peak memory {gib(small['peak_pss_bytes'])} at {small['rows']:,} rows → "
            f"{gib(big['peak_pss_bytes'])} at {big['rows']:,} rows ({growth:.2f}x)   "
            f"(targets: >= 50k rows/s, flat, < 3 GiB)"
        )
        results["orchestration"] = {"small": small, "big": big, "memory_growth": growth}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
