"""Serve soak: minutes of mixed traffic at high concurrency against the real Serve app while
its replica is SIGKILLed twice. Printed: the share of valid requests answered, their p50/p99
latency, 5xx outside and inside the kill windows, every status by request kind, and the
replica's memory before and after.

    python jobs/bench/serve_soak.py                         # 5 minutes, concurrency 32, ~6 min
    python jobs/bench/serve_soak.py --duration 60 --concurrency 16

Traffic (closed loop, --concurrency workers, each picking its next request at random):
valid chats (55%), streams the client cuts off after the first chunk (10%), malformed JSON
(10%), bodies over limits.max_body_bytes with a Content-Length (5%) and chunked (5%), and
requests without the key (15%). At 1/3 and 2/3 of the run the replica process is SIGKILLed;
a kill window lasts from the kill until a valid chat is answered again. Outside the windows
no request may get a 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cai_ray.runtime import free_port  # noqa: E402

KINDS = (("chat", 55), ("stream_cut", 10), ("malformed", 10), ("oversized", 5), ("chunked", 5), ("no_key", 15))
BODY_LIMIT = 200_000


def replica_pids() -> list[int]:
    import psutil

    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if " ".join(p.info["cmdline"] or []).startswith("ray::ServeReplica")
        and "CAIServer" in " ".join(p.info["cmdline"])
    ]


def rss(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def start(model: str, port: int) -> str:
    from cai_ray.config import load_config
    from cai_ray.serve.config import ServeConfig
    from cai_ray.serve.deployment import start as serve_start

    cfg = load_config(
        ServeConfig,
        None,
        [
            f"policy.model={model}",
            "policy.dtype=float32",
            "policy.threads=1",
            f"port={port}",
            "limits.max_tokens=16",
            "limits.default_max_tokens=8",
            f"limits.max_body_bytes={BODY_LIMIT}",
            "scaling.max_ongoing_requests=64",
            "scaling.max_queued_requests=256",
            "scaling.max_batch_size=16",
            "scaling.cpus_per_replica=1",
            "scaling.request_timeout_s=120",
        ],
    )
    return serve_start(cfg)


async def soak(url: str, key: str, duration: float, concurrency: int, kill_at: list[float]) -> dict:
    import httpx

    auth = {"Authorization": f"Bearer {key}"}
    results: list[dict] = []
    kills: list[float] = []
    t0 = time.perf_counter()
    rng = random.Random(0)
    names, weights = zip(*KINDS)
    chat = {"messages": [{"role": "user", "content": "Say something kind."}], "max_tokens": 8, "temperature": 0.7}

    async def chunks():  # no Content-Length: sent chunked
        for _ in range(2 * BODY_LIMIT // 65536 + 2):
            yield b"x" * 65536

    async def one(client, kind: str) -> int | str:
        try:
            if kind == "chat":
                return (await client.post(f"{url}/v1/chat/completions", json=chat, headers=auth)).status_code
            if kind == "stream_cut":
                async with client.stream(
                    "POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, headers=auth
                ) as r:
                    async for _ in r.aiter_raw():
                        break  # the client hangs up after the first bytes
                    return r.status_code
            if kind == "malformed":
                return (
                    await client.post(
                        f"{url}/v1/chat/completions",
                        content=b"{not json",
                        headers={**auth, "Content-Type": "application/json"},
                    )
                ).status_code
            if kind == "oversized":
                body = json.dumps({"messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]})
                return (
                    await client.post(
                        f"{url}/v1/chat/completions", content=body, headers={**auth, "Content-Type": "application/json"}
                    )
                ).status_code
            if kind == "chunked":
                return (
                    await client.post(
                        f"{url}/v1/chat/completions",
                        content=chunks(),
                        headers={**auth, "Content-Type": "application/json"},
                    )
                ).status_code
            return (await client.post(f"{url}/v1/chat/completions", json=chat)).status_code
        except (httpx.TransportError, httpx.StreamError) as e:
            # a refused body may end with the server closing the connection mid-upload
            return f"closed:{type(e).__name__}"

    async def worker(client):
        while time.perf_counter() - t0 < duration:
            kind = rng.choices(names, weights)[0]
            start = time.perf_counter()
            status = await one(client, kind)
            results.append(
                {
                    "kind": kind,
                    "start": start - t0,
                    "end": time.perf_counter() - t0,
                    "latency": time.perf_counter() - start,
                    "status": status,
                }
            )

    async def killer():
        for at in kill_at:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            pids = replica_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                kills.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(killer(), *(worker(client) for _ in range(concurrency)))
    return {"results": results, "kills": kills, "wall_s": time.perf_counter() - t0}


def summarise(run: dict) -> dict:
    res, kills = run["results"], run["kills"]
    windows = []
    for k in kills:  # from the kill until a valid chat started after it is answered
        back = min(
            (r["end"] for r in res if r["kind"] == "chat" and r["status"] == 200 and r["start"] > k),
            default=run["wall_s"],
        )
        windows.append((k, back))

    def in_window(r):
        return any(a <= r["end"] and r["start"] <= b for a, b in windows)

    def is_5xx(r):
        return isinstance(r["status"], int) and r["status"] >= 500

    chats = [r for r in res if r["kind"] == "chat"]
    ok = sorted(r["latency"] for r in chats if r["status"] == 200)
    by_kind = {k: dict(Counter(str(r["status"]) for r in res if r["kind"] == k)) for k, _ in KINDS}
    return {
        "requests": len(res),
        "valid_requests": len(chats),
        "valid_answered_share": len(ok) / len(chats) if chats else None,
        "valid_answered_share_outside_windows": (
            sum(r["status"] == 200 for r in chats if not in_window(r)) / max(1, sum(not in_window(r) for r in chats))
        ),
        "p50_s": statistics.median(ok) if ok else None,
        "p99_s": ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else None,
        "5xx_outside_kill_windows": sum(is_5xx(r) and not in_window(r) for r in res),
        "5xx_inside_kill_windows": sum(is_5xx(r) and in_window(r) for r in res),
        "kill_windows_s": [[round(a, 1), round(b, 1)] for a, b in windows],
        "by_kind": by_kind,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from ray import serve

    from cai_ray.runtime import init_ray, setup_logging

    setup_logging("WARNING")
    key = secrets.token_urlsafe(24)
    os.environ["CAI_RAY_API_KEY"] = key
    init_ray(None)
    url = start(args.model, free_port())
    import httpx

    for _ in range(4):  # warm-up
        httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
    [first] = replica_pids()
    mem_before = rss(first)
    kill_at = [args.duration / 3, 2 * args.duration / 3]
    mem = {}

    async def run():
        async def sample():  # the first replica's memory under load, just before it is killed
            await asyncio.sleep(kill_at[0] - 2)
            mem["first_replica_under_load"] = rss(first)

        out, _ = await asyncio.gather(soak(url, key, args.duration, args.concurrency, kill_at), sample())
        return out

    result = asyncio.run(run())
    [last] = replica_pids() or [None]
    mem_after = rss(last) if last else None
    s = summarise(result)
    s.update(
        duration_s=args.duration,
        concurrency=args.concurrency,
        model=args.model,
        kills=len(result["kills"]),
        replica_rss_before=mem_before,
        replica_rss_first_under_load=mem.get("first_replica_under_load"),
        replica_rss_after=mem_after,
    )
    serve.shutdown()
    gib = 2**20
    print(
        f"[serve soak] {args.duration:.0f} s, concurrency {args.concurrency}, {args.model}, replica killed "
        f"{s['kills']}x; {s['requests']} requests"
    )
    print(
        f"  valid chats answered: {s['valid_answered_share']:.1%} of {s['valid_requests']} "
        f"({s['valid_answered_share_outside_windows']:.1%} outside the kill windows {s['kill_windows_s']})"
    )
    print(f"  latency of answered chats: p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s")
    print(
        f"  5xx: {s['5xx_outside_kill_windows']} outside the kill windows (must be 0), "
        f"{s['5xx_inside_kill_windows']} inside"
    )
    print(
        f"  replica RSS: {mem_before / gib:.0f} MiB after warm-up, "
        f"{(s['replica_rss_first_under_load'] or 0) / gib:.0f} MiB under load before the first kill, "
        f"{(mem_after or 0) / gib:.0f} MiB for the last replica at the end"
    )
    for kind, counts in s["by_kind"].items():
        print(f"  {kind:10s} {counts}")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))


if __name__ == "__main__":
    main()
