"""Two Ray nodes on this machine: a token-authenticated head (as `cluster/local.sh` starts one)
and a worker node that can be lost mid-run, as a machine would be.

The worker node has its own logical CPUs, a custom resource ``node2`` (so work can be placed
on it), its own Ray temp dir, and its own TMPDIR and model cache ($CAI_RAY_CACHE): Ray workers
inherit the environment of the raylet that spawns them, so what that node's actors and Train
workers write to "local disk" lands in ``worker_tmp``, apart from the head's. Both nodes bind
Ray's node services to the machine's address; every port they need is a free one, so other
Ray instances on this machine are neither joined nor touched.

Only this cluster's processes are stopped: those whose command line holds one of the two temp
dirs (GCS, raylets, log monitors, dashboard) and everything their raylets spawned (workers,
agents). Never `ray stop`, which stops every Ray of the user.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cai_ray.runtime import free_port

RAY = str(Path(sys.executable).with_name("ray"))
# what the raylets hand down to their workers (a driver joining by address passes no env)
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# A driver of its own that prints the GCS actor table once a second, one JSON line each:
# [{"id", "class", "state", "node": "head" | "worker" | None, "restarts"}]. The GCS marks an actor
# ALIVE once its constructor returned (an engine actor: model loaded).
WATCH = r"""
import json, sys, time
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
worker, head = set(), set()
node = lambda i: "worker" if i in worker else "head" if i in head else None  # None: not placed (yet)
while True:
    worker |= {n["NodeID"] for n in ray.nodes() if "node2" in n["Resources"]}
    head |= {n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"]}
    print("ACTORS", json.dumps([
        {"id": i, "class": a["ActorClassName"], "state": a["State"], "restarts": a["NumRestarts"],
         "node": node(a["Address"]["NodeID"])}
        for i, a in state.actors().items()
    ]), flush=True)
    time.sleep(1)
"""


# run as a driver on the cluster (argv: address, model name)
ON_WORKER = r"""
import json, sys, tempfile, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0.1, resources={"node2": 0.01})
def probe(model):
    from cai_ray.models import resolve_model
    return {"tmp": tempfile.gettempdir(), "model": resolve_model(model)}

print(json.dumps(ray.get(probe.remote(sys.argv[2]))))
"""


class Watch:
    """The actors of this cluster as the GCS sees them, refreshed every second (``latest``);
    actors that existed when the watch started are left out."""

    def __init__(self, nodes: TwoNodes):
        import threading

        self.proc = subprocess.Popen(
            [sys.executable, "-c", WATCH, nodes.address], env=nodes.env, stdout=subprocess.PIPE, text=True
        )
        self.before: set[str] | None = None
        self.latest: list[dict] = []
        self.seen: list[dict] = []  # every (actor, state, node) ever reported, in order
        self.first = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.first.wait(120):
            self.stop()
            raise TimeoutError("the actor watch did not connect to the cluster")

    def _read(self) -> None:
        for line in self.proc.stdout:
            if not line.startswith("ACTORS "):  # anything else Ray prints
                continue
            snap = json.loads(line.removeprefix("ACTORS "))
            if self.before is None:
                self.before = {a["id"] for a in snap}
                self.first.set()
                continue
            self.latest = [a for a in snap if a["id"] not in self.before]
            for a in self.latest:
                key = {k: a[k] for k in ("id", "class", "state", "node")}
                if key not in self.seen:
                    self.seen.append(key)

    def actors(self, name: str, state: str | None = None, node: str | None = None) -> list[dict]:
        return [
            a
            for a in self.latest
            if name in a["class"] and (state is None or a["state"] == state) and (node is None or a["node"] == node)
        ]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class TwoNodes:
    def __init__(self, head_cpus: float = 2, worker_cpus: float = 2, object_store_mb: int = 300, env=None):
        # short paths: Ray's socket paths under the temp dir must stay under 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="cai2n-", dir="/tmp"))
        self.head_temp = self.root / "h"
        self.worker_temp = self.root / "w"
        self.worker_tmp = self.root / "wtmp"  # the worker node's TMPDIR: its "own disk"
        self.worker_cache = self.worker_tmp / "models"
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.object_store = str(object_store_mb * 2**20)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # clients (drivers, `ray status`) need these; RAY_ADDRESS from an outer session must not leak in
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        # ``env``: what every node (and so every Ray worker) needs, e.g. object-store credentials
        self.env.update({**WORKER_ENV, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})

    # -- up ----------------------------------------------------------------------------------
    def _start(self, args: list[str], env: dict[str, str]) -> None:
        r = subprocess.run([RAY, "start", *args], env=env, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    def start_head(self) -> None:
        self._start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                f"--num-cpus={self.head_cpus}",
                f"--object-store-memory={self.object_store}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.head_temp}",
                "--disable-usage-stats",
            ],
            self.env,
        )

    def start_worker(self) -> None:
        self.worker_tmp.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "TMPDIR": str(self.worker_tmp), "CAI_RAY_CACHE": str(self.worker_cache)}
        self._start(
            [
                f"--address={self.address}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.worker_cpus}",
                '--resources={"node2": 1}',
                f"--object-store-memory={self.object_store}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={self.worker_temp}",
                "--disable-usage-stats",
            ],
            env,
        )
        self.wait_for_nodes(2)

    def up(self) -> TwoNodes:
        self.start_head()
        self.start_worker()
        return self

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        """Until the GCS counts ``n`` alive nodes (a lost node takes its health checks to be declared dead)."""
        code = "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.time() + timeout
        alive = None
        while time.time() < deadline:
            r = subprocess.run(
                [sys.executable, "-c", code, self.address], env=self.env, capture_output=True, text=True, timeout=120
            )
            alive = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
            if alive == str(n):
                return
            time.sleep(2)
        raise TimeoutError(f"expected {n} alive Ray nodes, last answer: {alive}")

    def watch(self) -> Watch:
        return Watch(self)

    def on_worker_node(self, model: str = "tiny-random") -> dict:
        """Run a task on the worker node: its temp dir and ``model`` resolved there (built into
        that node's own cache the first time), as its Ray workers see them."""
        r = subprocess.run(
            [sys.executable, "-c", ON_WORKER, self.address, model],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        return json.loads(r.stdout.strip().splitlines()[-1])

    def lose_worker_mid_run(
        self, cmd: list[str], actor: str, written: Callable[[], int], total: int, log: Path, cwd
    ) -> dict:
        """Run a stage command (a driver joining this cluster); once an engine actor of class
        ``actor`` is up on the worker node and ``written()`` (rows in the output) is above 0,
        kill the worker node and let the run finish. Returns its exit code, wall time, when
        the kill came and how many rows were written by then, and the actors seen
        (``Watch.seen``, ``latest``). Refuses a run whose ``total`` rows were all written
        before the worker node's actor was up: losing the node then tests nothing."""
        watch = self.watch()
        try:
            t0 = time.perf_counter()
            with log.open("w") as fh:
                proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
                try:
                    deadline = time.time() + 600
                    while not (watch.actors(actor, "ALIVE", "worker") and written() > 0):
                        if proc.poll() is not None:
                            raise RuntimeError("the run ended before the worker node could be lost; see " + str(log))
                        if time.time() > deadline:
                            raise TimeoutError(f"no {actor} came up on the worker node in 600 s")
                        time.sleep(0.5)
                    time.sleep(1)  # the worker node's actor holds a batch now (blocks are queued)
                    if proc.poll() is not None:
                        raise RuntimeError("the run ended before the worker node could be lost; see " + str(log))
                    killed_at, rows_at_kill = time.perf_counter() - t0, written()
                    if rows_at_kill >= total:
                        raise RuntimeError(
                            f"all {total} rows were written before the worker node's {actor} was up: give it more rows"
                        )
                    self.kill_worker()
                    rc = proc.wait(timeout=1800)
                finally:
                    if proc.poll() is None:
                        proc.kill()
            wall = time.perf_counter() - t0
            time.sleep(1.5)  # one more snapshot of the actor table
            return {
                "rc": rc,
                "wall_s": wall,
                "killed_at_s": killed_at,
                "rows_at_kill": rows_at_kill,
                "seen": watch.seen,
                "latest": watch.latest,
            }
        finally:
            watch.stop()

    # -- processes ---------------------------------------------------------------------------
    def processes(self, temp: Path) -> list:
        """The node's own processes (command line holds its temp dir) and all their descendants."""
        import psutil

        mine, me = [], os.getuid()
        for p in psutil.process_iter(["pid", "uids", "cmdline"]):
            try:
                if p.info["uids"] and p.info["uids"].real == me and str(temp) in " ".join(p.info["cmdline"] or []):
                    mine.append(p)
            except psutil.Error:
                continue
        out = {p.pid: p for p in mine}
        for p in mine:
            try:
                out.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                continue
        return list(out.values())

    def worker_actor_pids(self, name: str) -> list[int]:
        """Ray worker processes of the worker node running actor class ``name`` (``ray::SLWorker...``)."""
        import psutil

        pids = []
        for p in self.processes(self.worker_temp):
            try:
                if " ".join(p.cmdline()).startswith("ray::") and name in " ".join(p.cmdline()):
                    pids.append(p.pid)
            except psutil.Error:
                continue
        return pids

    def _signal(self, procs: list, sig: int) -> None:
        for p in procs:
            try:
                p.send_signal(sig)
            except Exception:  # gone already
                pass

    def kill_worker(self) -> None:
        """The worker node is lost: SIGKILL its raylet, object store, agents and every worker
        process at once (no drain, no goodbye to the GCS), as a machine that loses power."""
        self._signal(self.processes(self.worker_temp), signal.SIGKILL)

    def down(self) -> None:
        """Stop both nodes (and only them): SIGTERM, then SIGKILL what is left after 10 s."""
        import psutil

        procs = self.processes(self.worker_temp) + self.processes(self.head_temp)
        self._signal(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=10)
        self._signal(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)
        subprocess.run(["rm", "-rf", str(self.root)], check=False)
