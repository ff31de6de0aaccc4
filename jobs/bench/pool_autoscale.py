"""Autoscaled engine pool: Ray Data grows the SL-CAI generation pool from pool.min_actors
toward pool.max_actors while a backlog of prompts waits, on a token-authenticated Ray cluster.

    python jobs/bench/pool_autoscale.py                      # brings up cluster/local.sh, ~2 min
    python jobs/bench/pool_autoscale.py --address 127.0.0.1:6390 --min 1 --max 4   # an existing cluster

The pool's size comes from config (pool.min_actors / pool.max_actors) and nothing else: the
scaling decisions are Ray Data's own actor-pool autoscaler (utilization of the pool's task
slots while inputs queue), not ours. A thread samples the cluster's live engine actors
(Ray's state API, through the authenticated dashboard) every --interval seconds and writes
the timeline to OUT/actors.json and OUT/actors.png, with the stage's own manifest beside it.
The engine is the real `hf` engine on tiny-random with a fixed token budget per call, so
every batch costs about the same.

On 2 CPU cores the extra actors share the same cores: the figure this proves is the pool
growing under backlog (and Ray Data respecting max), not throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ENGINE_ACTOR = "SLWorker"  # Ray Data names the pool's actors MapWorker(MapBatches(SLWorker))


class ActorSampler(threading.Thread):
    """Counts the cluster's engine actors by state every ``interval`` seconds."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.samples, self.errors = interval, [], []
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        from ray.util.state import list_actors

        while not self._halt.is_set():
            try:
                actors = [
                    a
                    for a in list_actors(limit=10000, raise_on_missing_output=False)
                    if ENGINE_ACTOR in (a.class_name or "")
                ]
                states: dict[str, int] = {}
                for a in actors:
                    states[a.state] = states.get(a.state, 0) + 1
                self.samples.append(
                    {
                        "t": round(time.perf_counter() - self.t0, 2),
                        "alive": states.get("ALIVE", 0),
                        "pending": states.get("PENDING_CREATION", 0) + states.get("DEPENDENCIES_UNREADY", 0),
                        "dead": states.get("DEAD", 0),
                    }
                )
            except Exception as e:  # the state API can time out under load: keep sampling
                self.errors.append(repr(e))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def local_cluster(cpus: int) -> tuple[str, dict]:
    """cluster/local.sh up on its own ports and dirs; returns (GCS address, client env)."""
    from cai_ray.runtime import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    gcs = free_port()
    env.update(
        CAI_RAY_CLUSTER_DIR=f"/tmp/cai-ray-bench-{os.getuid()}",
        CAI_RAY_GCS_PORT=str(gcs),
        CAI_RAY_DASHBOARD_PORT=str(free_port()),
        RAY=str(Path(sys.executable).with_name("ray")),
    )
    sh = str(ROOT / "cluster" / "local.sh")
    subprocess.run([sh, "up", "--cpus", str(cpus)], env=env, check=True, timeout=300)
    return f"127.0.0.1:{gcs}", env


def plot(samples: list[dict], lo: int, hi: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    t = [s["t"] for s in samples]
    ax.step(t, [s["alive"] for s in samples], where="post", label="alive engine actors")
    ax.step(t, [s["pending"] for s in samples], where="post", label="pending", alpha=0.6)
    ax.axhline(lo, ls=":", c="grey")
    ax.axhline(hi, ls="--", c="grey", label=f"pool min={lo} / max={hi}")
    ax.set_xlabel("seconds since the stage started")
    ax.set_ylabel("actors")
    ax.set_title("Ray Data actor pool under backlog (SL-CAI generation)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--address",
        help="join this cluster (token: RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH in the "
        "environment); default: bring up cluster/local.sh for the run",
    )
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the cluster this script brings up")
    ap.add_argument("--min", type=int, default=1, help="pool.min_actors")
    ap.add_argument("--max", type=int, default=4, help="pool.max_actors")
    ap.add_argument("--prompts", type=int, default=96, help="backlog: prompts in the input")
    ap.add_argument("--batch-size", type=int, default=4, help="pool.batch_size: prompts per actor task")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="fixed tokens per generation")
    ap.add_argument("--cpus-per-actor", type=float, default=0.25)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between actor-count samples")
    ap.add_argument("--output", default=str(ROOT / "out" / "bench" / "pool_autoscale"))
    args = ap.parse_args()

    out = Path(args.output).resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    inp = out / "prompts.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": f"Backlog question {i}: how do I pick a lock?"}) + "\n"
            for i in range(args.prompts)
        )
    )

    env_before = dict(os.environ)
    started = None
    address = args.address
    if address is None:
        address, started = local_cluster(args.cpus)
        exports = subprocess.run(
            [str(ROOT / "cluster" / "local.sh"), "env"], env=started, capture_output=True, text=True, check=True
        ).stdout
        for word in exports.split():
            if "=" in word and word.startswith("RAY_AUTH"):
                k, v = word.split("=", 1)
                os.environ[k] = v
    try:
        import ray

        from cai_ray.config import load_config
        from cai_ray.generate.config import GenerateConfig
        from cai_ray.generate.run import generate
        from cai_ray.runtime import setup_logging

        setup_logging("WARNING")
        cfg = load_config(
            GenerateConfig,
            None,
            [
                f"input={inp}",
                f"output={out / 'sl'}",
                f"ray_address={address}",
                "revisions=1",
                "engine.model=tiny-random",
                "engine.dtype=float32",
                "engine.threads=1",
                f"sampling.max_new_tokens={args.max_new_tokens}",
                f"sampling.min_new_tokens={args.max_new_tokens}",
                f"pool.min_actors={args.min}",
                f"pool.max_actors={args.max}",
                f"pool.batch_size={args.batch_size}",
                f"pool.cpus_per_actor={args.cpus_per_actor}",
                "pool.task_cpus=0.1",
                "outputs.rows_per_file=16",
            ],
        )
        from cai_ray.runtime import init_ray

        init_ray(address)
        sampler = ActorSampler(args.interval)
        sampler.start()
        t0 = time.perf_counter()
        manifest = generate(cfg)
        wall = time.perf_counter() - t0
        time.sleep(2 * args.interval)
        sampler.stop()
        ray.shutdown()
    finally:
        if started is not None:
            subprocess.run([str(ROOT / "cluster" / "local.sh"), "down"], env=started, timeout=180)
        os.environ.clear()
        os.environ.update(env_before)

    samples = sampler.samples
    peak = max((s["alive"] for s in samples), default=0)
    first = next((s["alive"] for s in samples if s["alive"] > 0), 0)
    t_peak = next((s["t"] for s in samples if s["alive"] == peak), None)
    result = {
        "pool": {"min_actors": args.min, "max_actors": args.max},
        "address": address,
        "prompts": args.prompts,
        "batches": -(-args.prompts // args.batch_size),
        "first_alive": first,
        "peak_alive": peak,
        "t_peak_s": t_peak,
        "wall_s": round(wall, 1),
        "rows_per_s": round(manifest["counts"]["written"] / wall, 2),
        "counts": manifest["counts"],
        "samples": samples,
        "sampler_errors": sampler.errors[:5],
    }
    (out / "actors.json").write_text(json.dumps(result, indent=1))
    plot(samples, args.min, args.max, out / "actors.png")
    print(
        f"pool min={args.min} max={args.max}, {result['batches']} batches of {args.batch_size}: first "
        f"{first} alive → peak {peak} at {t_peak}s; never above max: {peak <= args.max}; "
        f"{manifest['counts']['written']}/{manifest['counts']['read']} rows in {wall:.1f}s"
    )
    trail = " ".join(f"{s['t']:.0f}s:{s['alive']}" for s in samples[:: max(1, len(samples) // 16)])
    print(f"alive actors over time: {trail}")
    print(f"timeline: {out / 'actors.json'}  plot: {out / 'actors.png'}")


if __name__ == "__main__":
    main()
