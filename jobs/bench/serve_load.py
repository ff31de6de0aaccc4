"""Serving under load: throughput and latency of `cai-ray serve` over real HTTP.

    python jobs/bench/serve_load.py                          # tiny-random and smollm2, ~6 min on 2 cores
    python jobs/bench/serve_load.py --models tiny-random --levels 1 8 --json out.json

For each model, the real Ray Serve app on 127.0.0.1 (one replica, bearer auth on) is sent
chat completions from an asyncio load generator holding CONCURRENCY requests in flight
(closed loop). Every request asks for exactly --tokens tokens (``min_tokens = max_tokens``),
so batched and unbatched runs do the same work. Reported per concurrency level: requests/s,
generated tokens/s, latency p50/p95 (client side, full response).

Then, at --compare-concurrency (16), the same app with ``scaling.max_batch_size`` = 1
(every request its own engine call) against the batched one (--max-batch-size): the ratio
of their throughputs is what ``@serve.batch`` buys. The two run side by side in this one
process, on the same model and prompts.
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


def start_server(model: str, dtype: str, max_batch_size: int, port: int, tokens: int):
    from cai_ray.config import ServeConfig, load_config
    from cai_ray.serve.deployment import start

    cfg = load_config(ServeConfig, None, [
        f"policy.model={model}", f"policy.dtype={dtype}", f"policy.threads={os.cpu_count()}",
        f"policy.max_batch_size={max(max_batch_size, 1)}", f"port={port}",
        f"limits.max_tokens={tokens}", f"limits.default_max_tokens={tokens}",
        # nothing turned away: this measures throughput, not backpressure
        "scaling.max_ongoing_requests=64", "scaling.max_queued_requests=512",
        f"scaling.max_batch_size={max_batch_size}", "scaling.batch_wait_timeout_s=0.01",
        f"scaling.cpus_per_replica={min(1.0, os.cpu_count() - 0.5)}", "scaling.request_timeout_s=600",
    ])
    return start(cfg)


async def load(url: str, key: str, texts: list[str], concurrency: int, tokens: int) -> dict:
    """Closed loop: CONCURRENCY workers, each sending its next request when the last returns."""
    import httpx

    latencies: list[float] = []
    completion_tokens = 0
    errors: dict[int, int] = {}
    queue = list(texts)

    async def worker(client):
        nonlocal completion_tokens
        while queue:
            text = queue.pop()
            t = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": text}], "max_tokens": tokens, "min_tokens": tokens,
                "temperature": 0.7})
            if r.status_code != 200:
                errors[r.status_code] = errors.get(r.status_code, 0) + 1
                continue
            latencies.append(time.perf_counter() - t)
            completion_tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": len(texts), "ok": len(lat), "errors": errors, "wall_s": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 3), "tokens_per_s": round(completion_tokens / wall, 1),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
    }


def run_model(model: str, args, key: str) -> dict:
    from ray import serve

    out: dict = {"model": model, "levels": [], "compare": {}}
    for batch, label in ((args.max_batch_size, "batched"), (1, "unbatched")):
        url = start_server(model, args.dtype, batch, free_port(), args.tokens)
        asyncio.run(load(url, key, prompts(4), 4, args.tokens))  # warm-up (first forward passes)
        if batch > 1:
            for c in args.levels:
                res = asyncio.run(load(url, key, prompts(args.requests_per_slot * c), c, args.tokens))
                out["levels"].append(res)
                print(f"  {model:12s} batched  c={c:3d}: {res['requests_per_s']:7.2f} req/s "
                      f"{res['tokens_per_s']:8.1f} tok/s  p50 {res['p50_s']:.2f} s  p95 {res['p95_s']:.2f} s"
                      f"{'  errors ' + str(res['errors']) if res['errors'] else ''}", flush=True)
        c = args.compare_concurrency
        res = asyncio.run(load(url, key, prompts(args.requests_per_slot * c), c, args.tokens))
        out["compare"][label] = res
        print(f"  {model:12s} {label:9s}c={c:3d}: {res['requests_per_s']:7.2f} req/s "
              f"{res['tokens_per_s']:8.1f} tok/s  p50 {res['p50_s']:.2f} s  p95 {res['p95_s']:.2f} s", flush=True)
        serve.shutdown()
    b, u = out["compare"]["batched"], out["compare"]["unbatched"]
    out["batched_vs_unbatched"] = round(b["tokens_per_s"] / u["tokens_per_s"], 2)
    print(f"  {model:12s} batched / unbatched at c={args.compare_concurrency}: "
          f"{out['batched_vs_unbatched']:.2f}x tokens/s   (target >= 2)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", nargs="+", default=["tiny-random", "smollm2"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32], help="concurrency levels")
    ap.add_argument("--compare-concurrency", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16, help="@serve.batch size of the batched app")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request (exactly)")
    ap.add_argument("--requests-per-slot", type=int, default=3,
                    help="requests per concurrency slot (level 8 sends 24)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from cai_ray.runtime import init_ray, setup_logging

    setup_logging("WARNING")
    key = secrets.token_urlsafe(24)
    os.environ["CAI_RAY_API_KEY"] = key
    init_ray(None)
    print(f"[serve] {os.cpu_count()} cores, {args.tokens} tokens per request, one replica, "
          f"@serve.batch {args.max_batch_size}", flush=True)
    results = {"cores": os.cpu_count(), "tokens_per_request": args.tokens, "dtype": args.dtype,
               "max_batch_size": args.max_batch_size, "models": [run_model(m, args, key) for m in args.models]}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
