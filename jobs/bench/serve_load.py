"""Serving under load: throughput, latency and time to first token of `cai-ray serve` over
real HTTP, with an hf and a vllm replica side by side.

    python jobs/bench/serve_load.py                          # smollm2, hf and vllm, ~12 min on 2 cores
    python jobs/bench/serve_load.py --engines hf --models tiny-random --levels 1 8 --json out.json

For each model and engine, the real Ray Serve app on 127.0.0.1 (one replica, bearer auth on)
is sent streaming chat completions (``stream: true``) from an asyncio load generator holding
CONCURRENCY requests in flight (closed loop). Every request asks for exactly --tokens tokens
(``min_tokens = max_tokens``), so every run does the same work. Reported per concurrency
level: requests/s, generated tokens/s, latency p50/p95 (client side, until [DONE]) and time
to first token p50/p95 (until the first chunk with text). An hf replica answers through
``@serve.batch`` and sends the finished answer as chunks (its first token comes with the
last); a vllm replica streams tokens as vLLM makes them (continuous batching, no
@serve.batch).

Then, for hf at --compare-concurrency (16), the same app with ``scaling.max_batch_size`` = 1
(every request its own engine call) against the batched one (--max-batch-size): the ratio
of their throughputs is what ``@serve.batch`` buys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cai_ray.runtime import free_port  # noqa: E402


def prompts(n: int) -> list[str]:
    rows = [json.loads(x) for x in (ROOT / "jobs" / "data" / "red_team.jsonl").read_text().splitlines()]
    return [rows[i % len(rows)]["prompt"] for i in range(n)]


def start_server(model: str, engine: str, dtype: str, max_batch_size: int, port: int, tokens: int):
    from cai_ray.config import load_config
    from cai_ray.serve.config import ServeConfig
    from cai_ray.serve.deployment import start

    cfg = load_config(
        ServeConfig,
        None,
        [
            f"policy.model={model}",
            f"policy.dtype={dtype}",
            f"policy.threads={os.cpu_count()}",
            f"policy.max_batch_size={max(max_batch_size, 1)}",
            f"port={port}",
            f"limits.max_tokens={tokens}",
            f"limits.default_max_tokens={tokens}",
            # nothing turned away: this measures throughput, not backpressure
            "scaling.max_ongoing_requests=64",
            "scaling.max_queued_requests=512",
            f"scaling.max_batch_size={max_batch_size}",
            "scaling.batch_wait_timeout_s=0.01",
            f"scaling.cpus_per_replica={min(1.0, os.cpu_count() - 0.5)}",
            "scaling.request_timeout_s=600",
            f"policy.backend={engine}",
            *(["policy.kv_cache_gb=2"] if engine == "vllm" else []),
        ],
    )
    return start(cfg)


async def load(url: str, key: str, texts: list[str], concurrency: int, tokens: int) -> dict:
    """Closed loop: CONCURRENCY workers, each sending its next (streaming) request when the
    last one has finished."""
    import httpx

    latencies: list[float] = []
    first_token: list[float] = []
    errors: dict[int, int] = {}
    queue = list(texts)

    async def worker(client):
        while queue:
            text = queue.pop()
            t = time.perf_counter()
            first = None
            async with client.stream(
                "POST",
                f"{url}/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": text}],
                    "max_tokens": tokens,
                    "min_tokens": tokens,
                    "temperature": 0.7,
                    "stream": True,
                },
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1
                    continue
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        if delta.get("content"):
                            first = time.perf_counter() - t
            latencies.append(time.perf_counter() - t)
            first_token.append(first if first is not None else latencies[-1])

    def pct(xs: list[float], q: float):
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(texts),
        "ok": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        # min_tokens = max_tokens: every answered request generated exactly `tokens` tokens
        "tokens_per_s": round(len(latencies) * tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": pct(latencies, 0.95),
        "ttft_p50_s": round(statistics.median(first_token), 3) if first_token else None,
        "ttft_p95_s": pct(first_token, 0.95),
    }


def line(model: str, engine: str, label: str, res: dict) -> str:
    return (
        f"  {model:10s} {engine:5s} {label:9s}c={res['concurrency']:3d}: {res['requests_per_s']:7.2f} req/s "
        f"{res['tokens_per_s']:8.1f} tok/s  p50 {res['p50_s']:.2f} s  p95 {res['p95_s']:.2f} s  "
        f"TTFT p50 {res['ttft_p50_s']:.2f} s  p95 {res['ttft_p95_s']:.2f} s"
        f"{'  errors ' + str(res['errors']) if res['errors'] else ''}"
    )


def run_model(model: str, engine: str, args, key: str) -> dict:
    from ray import serve

    out: dict = {"model": model, "engine": engine, "levels": [], "compare": {}}
    runs = ((args.max_batch_size, "batched"), (1, "unbatched")) if engine == "hf" else ((args.max_batch_size, "async"),)
    for batch, label in runs:
        url = start_server(model, engine, args.dtype, batch, free_port(), args.tokens)
        asyncio.run(load(url, key, prompts(4), 4, args.tokens))  # warm-up (first forward passes)
        if batch > 1:
            for c in args.levels:
                res = asyncio.run(load(url, key, prompts(args.requests_per_slot * c), c, args.tokens))
                out["levels"].append(res)
                print(line(model, engine, label, res), flush=True)
        if engine == "hf":
            c = args.compare_concurrency
            res = asyncio.run(load(url, key, prompts(args.requests_per_slot * c), c, args.tokens))
            out["compare"][label] = res
            print(line(model, engine, label, res), flush=True)
        serve.shutdown()
    if engine == "hf":
        b, u = out["compare"]["batched"], out["compare"]["unbatched"]
        out["batched_vs_unbatched"] = round(b["tokens_per_s"] / u["tokens_per_s"], 2)
        print(
            f"  {model:10s} hf batched / unbatched at c={args.compare_concurrency}: "
            f"{out['batched_vs_unbatched']:.2f}x tokens/s   (target >= 2)",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--models", nargs="+", default=["smollm2"])
    ap.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32], help="concurrency levels")
    ap.add_argument("--compare-concurrency", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16, help="@serve.batch size of the batched app")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request (exactly)")
    ap.add_argument("--requests-per-slot", type=int, default=3, help="requests per concurrency slot (level 8 sends 24)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from cai_ray.runtime import init_ray, setup_logging

    setup_logging("WARNING")
    key = secrets.token_urlsafe(24)
    os.environ["CAI_RAY_API_KEY"] = key
    init_ray(None)
    print(
        f"[serve] {os.cpu_count()} cores, {args.tokens} tokens per request, one replica, "
        f"@serve.batch {args.max_batch_size}",
        flush=True,
    )
    results = {
        "cores": os.cpu_count(),
        "tokens_per_request": args.tokens,
        "dtype": args.dtype,
        "max_batch_size": args.max_batch_size,
        "models": [run_model(m, e, args, key) for m in args.models for e in args.engines],
    }
    for m in args.models:
        by = {r["engine"]: r for r in results["models"] if r["model"] == m}
        if "hf" in by and "vllm" in by:
            for h, v in zip(by["hf"]["levels"], by["vllm"]["levels"]):
                print(
                    f"  {m} c={h['concurrency']:3d}: vllm / hf {v['tokens_per_s'] / h['tokens_per_s']:.2f}x tokens/s, "
                    f"TTFT p50 {h['ttft_p50_s']:.2f} s (hf) vs {v['ttft_p50_s']:.2f} s (vllm)",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
