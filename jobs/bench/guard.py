"""What the serve guard costs and what it refuses: no guard / classifier guard / critique-revise
guardrail on the same requests.

    python jobs/bench/guard.py --classifiers out/classifiers        # smollm2, 40 requests each way
    python jobs/bench/guard.py --classifiers DIR --policy tiny-random --n 8 --tokens 32 --json guard.json
    python jobs/bench/guard.py --classifiers DIR --modes none classifier \
        --guard-set classifier.input_threshold=1 classifier.output_threshold=1   # the checks' cost alone

The real Ray Serve app on 127.0.0.1 (one hf replica, bearer auth on) is started three times
on the same policy: ``guard: none``, ``guard: classifier`` with the classifiers of a
`cai-ray classifiers` OUTPUT folder (``--classifiers``; its guard.json thresholds), and the
critique-and-revise ``guardrail: true``. Each is sent the same --n red-team prompts
(jobs/data/red_team_eval.jsonl, the held-out set) and --n benign ones (jobs/data/benign.jsonl),
cycled when --n is larger than a set, greedy, --tokens tokens at most, --concurrency
requests in flight (closed loop). Reported per mode: latency p50/p99 (client side, until the
whole answer), the latency each request added over the same request without a guard (p50,
p99 of the paired differences), generated tokens/s, and the refusal rate on each set: the
guard's refusals (``cai_guard``) plus answers that read as refusals
(``core.refusal.is_refusal``), and the guard's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cai_ray.runtime import free_port  # noqa: E402

SETS = {"red_team": "red_team_eval.jsonl", "benign": "benign.jsonl"}
MODES = {
    "none": [],
    "classifier": ["guard=classifier"],  # + classifier.path
    "guardrail": ["guardrail=true"],
}


def requests(n: int) -> list[tuple[str, str]]:
    """(set, prompt): n of each set, cycled."""
    out = []
    for name, file in SETS.items():
        rows = [json.loads(x) for x in (ROOT / "jobs" / "data" / file).read_text().splitlines() if x.strip()]
        out += [(name, rows[i % len(rows)]["prompt"]) for i in range(n)]
    return out


def start_server(mode: str, args, port: int) -> str:
    from cai_ray.config import load_config
    from cai_ray.serve.config import ServeConfig
    from cai_ray.serve.deployment import start

    extra = list(MODES[mode])
    if mode == "classifier":
        extra.append(f"classifier.path={args.classifiers}")
        extra += args.guard_set
    cfg = load_config(
        ServeConfig,
        None,
        [
            f"policy.model={args.policy}",
            f"policy.dtype={args.dtype}",
            f"policy.threads={os.cpu_count()}",
            f"port={port}",
            f"limits.max_tokens={args.tokens}",
            f"limits.default_max_tokens={args.tokens}",
            "scaling.max_ongoing_requests=64",
            "scaling.max_queued_requests=512",
            f"scaling.cpus_per_replica={min(1.0, os.cpu_count() - 0.5)}",
            "scaling.request_timeout_s=600",
            *extra,
        ],
    )
    return start(cfg)


async def send(url: str, key: str, reqs: list[tuple[str, str]], concurrency: int, tokens: int) -> dict:
    """Every request once (CONCURRENCY in flight): per request its latency, completion
    tokens, answer and guard decision, in request order; and the wall time."""
    import httpx

    out: list[dict | None] = [None] * len(reqs)
    queue = list(enumerate(reqs))

    async def worker(client):
        while queue:
            i, (name, prompt) = queue.pop(0)
            t0 = time.perf_counter()
            r = await client.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0},
            )
            dt = time.perf_counter() - t0
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            ok = r.status_code == 200
            out[i] = {
                "set": name,
                "status": r.status_code,
                "latency_s": dt,
                "tokens": body.get("usage", {}).get("completion_tokens", 0) if ok else 0,
                "text": body["choices"][0]["message"]["content"] if ok else "",
                "guard": (body.get("cai_guard") or {}) if ok else {},
            }

    t0 = time.perf_counter()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"wall_s": time.perf_counter() - t0, "rows": out}


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of xs."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(run: dict, base: dict | None) -> dict:
    from cai_ray.core.refusal import is_refusal

    rows = run["rows"]
    ok = [r for r in rows if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    res = {
        "requests": len(rows),
        "errors": len(rows) - len(ok),
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "tokens_per_s": sum(r["tokens"] for r in ok) / run["wall_s"],
        "wall_s": run["wall_s"],
    }
    if base is not None:
        added = [
            r["latency_s"] - b["latency_s"] for r, b in zip(rows, base["rows"]) if r["status"] == b["status"] == 200
        ]
        res["added_p50_s"], res["added_p99_s"] = pct(added, 0.5), pct(added, 0.99)
    for name in SETS:
        mine = [r for r in ok if r["set"] == name]
        guard = [r["guard"].get("decision") == "refused" for r in mine]
        refused = [g or is_refusal(r["text"]) for g, r in zip(guard, mine)]
        res[f"{name}_refusal_rate"] = sum(refused) / len(mine) if mine else None
        res[f"{name}_guard_refusal_rate"] = sum(guard) / len(mine) if mine else None
    return res


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--classifiers", required=True, help="a `cai-ray classifiers` OUTPUT folder (with guard.json)")
    ap.add_argument("--policy", default="smollm2", help="the served model")
    ap.add_argument("--n", type=int, default=40, help="requests per set (red-team, benign), cycled")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--json", help="also write the figures (and every answer) here")
    ap.add_argument(
        "--guard-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="serve overrides for the classifier mode, e.g. classifier.input_threshold=1 "
        "classifier.output_threshold=1 (never flags: the checks' cost alone)",
    )
    args = ap.parse_args()

    from ray import serve

    from cai_ray.runtime import init_ray, setup_logging
    from cai_ray.serve.guard import read_guard_spec

    read_guard_spec(args.classifiers)  # a bad folder stops here, not after the first run
    args.classifiers = str(Path(args.classifiers).resolve())
    setup_logging("WARNING")
    key = secrets.token_urlsafe(24)
    os.environ["CAI_RAY_API_KEY"] = key
    init_ray(None)
    reqs = requests(args.n)
    print(
        f"[guard] {args.policy}, {len(reqs)} requests ({args.n} red-team, {args.n} benign), {args.tokens} tokens at "
        f"most, concurrency {args.concurrency}, {os.cpu_count()} cores",
        flush=True,
    )
    runs: dict[str, dict] = {}
    for mode in args.modes:
        url = start_server(mode, args, free_port())
        asyncio.run(send(url, key, reqs[:2], 1, args.tokens))  # warm-up: first forward passes
        runs[mode] = asyncio.run(send(url, key, reqs, args.concurrency, args.tokens))
        serve.shutdown()
    base = runs.get("none")
    results = {m: summary(r, base if m != "none" else None) for m, r in runs.items()}
    print(
        f"{'mode':11s} {'p50 s':>7s} {'p99 s':>7s} {'+p50 s':>7s} {'+p99 s':>7s} {'tok/s':>7s}  "
        f"{'refused: red-team':>17s} {'(guard)':>7s} {'benign':>7s} {'(guard)':>7s} {'errors':>6s}"
    )
    for m, s in results.items():
        print(
            f"{m:11s} {fmt(s['p50_s']):>7s} {fmt(s['p99_s']):>7s} {fmt(s.get('added_p50_s')):>7s} "
            f"{fmt(s.get('added_p99_s')):>7s} {fmt(s['tokens_per_s'], '.1f'):>7s}  "
            f"{fmt(s['red_team_refusal_rate']):>17s} {fmt(s['red_team_guard_refusal_rate']):>7s} "
            f"{fmt(s['benign_refusal_rate']):>7s} {fmt(s['benign_guard_refusal_rate']):>7s} {s['errors']:6d}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "summary": results, "runs": runs}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
