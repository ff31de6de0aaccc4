"""GPU-to-GPU weight transfer to the rollout pool over NCCL, through vLLM's own trainer engine.

    trainer rank 0 (GPU)                    NCCL group: rank 0 = the trainer,   vLLM engine actor i
    PolicySource: gathered params ──bcast──► rank 1 + i = engine i ───────────► (GPU): vLLM's "nccl"
    (ZeRO-3: every rank iterates,            (vLLM's packed broadcast)           backend receives and
    only rank 0 sends)                                                           loads layerwise

vLLM 0.32 ships both ends: ``NCCLWeightTransferEngine`` in the engine (``weight_transfer_config
={"backend": "nccl"}``) and ``NCCLTrainerWeightTransferEngine`` for the trainer, which drives the
handshake through any object with the four methods of its ``VLLMWeightSyncClient`` protocol and
reads the weights from a ``WeightSource`` (``metadata()`` without gathering, then one tensor at
a time). We give it ``PoolSyncClient`` (our engine actors, each call under a deadline, engine i at
NCCL rank 1 + i) and ``policy_source`` (the policy's parameters, ZeRO-3 shapes from ``ds_shape``).

An NCCL broadcast has no timeout of its own: a dead engine leaves the sender waiting forever
(the most reported RL hang in OpenRLHF's and verl's trackers). So every NCCL round runs in a
thread the trainer waits for under ``rollout.sync_timeout_s``; past it the step fails with
``WeightSyncTimeout`` (the group is unusable then; a restart from the checkpoint builds a new one).

``rollout.transfer: auto`` picks this path on GPUs with vLLM engines and full weights; LoRA
adapters (small) and CPUs use the object store (transfer.py). Not run on a GPU yet: the GPU
machine this project is lent has no vLLM.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from cai_ray.train.ppo.transfer import WeightSyncTimeout


def within(fn, timeout: float, what: str):
    """``fn()`` in a thread, waited for ``timeout`` seconds: an NCCL call that never returns
    becomes a ``WeightSyncTimeout`` saying what was waited for (the thread is left behind)."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="cai-ray-weight-sync", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise WeightSyncTimeout(
            f"{what} within {timeout:g} s (rollout.sync_timeout_s): the NCCL group is unusable now; "
            "the step fails, and a restart from the last checkpoint builds a new one"
        )
    if "error" in box:
        raise box["error"]
    return box.get("value")


class PoolSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over the pool's engine actors: each call fans
    out to every engine and waits under a deadline. Engine i joins the NCCL group at rank
    ``rank_offset + i`` (vLLM's trainer engine names the first engine rank; one GPU each)."""

    def __init__(self, handles: list, timeout: float):
        self.handles, self.timeout = handles, timeout
        self.version: int | None = None  # the version finish_weight_update records (set per round)
        self.engine_seconds = 0.0

    def _all(self, calls: list, what: str):
        from cai_ray.train.ppo.pool import get_within

        return get_within(calls, self.timeout, what)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        base = init_info["rank_offset"]
        self._all(
            [h.init_transfer.remote({**init_info, "rank_offset": base + i}) for i, h in enumerate(self.handles)],
            "the rollout engines did not join the NCCL weight-transfer group",
        )

    def start_weight_update(self) -> None:
        self._all([h.start_update.remote() for h in self.handles], "the rollout engines did not start a weight update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all(
            [h.receive_broadcast.remote(update_info) for h in self.handles],
            "the rollout engines did not receive the NCCL broadcast",
        )

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        seconds = self._all(
            [h.finish_update.remote(version) for h in self.handles],
            "the rollout engines did not finish the weight update",
        )
        self.engine_seconds = max(seconds)


def policy_source(named_parameters, weights):
    """vLLM's ``WeightSource`` over the policy: ``metadata()`` from ``named_parameters()``
    without gathering (a ZeRO-3 parameter's full shape is its ``ds_shape``), iteration from
    ``weights()`` (``Learner.weights``: gathered one at a time on every rank). Both list the
    same parameters in the same order, as vLLM's sender checks."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class PolicySource(WeightSource):
        def metadata(self):
            return [ParamMeta(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in named_parameters()]

        def __iter__(self):
            return iter(weights())

    return PolicySource()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class NcclPush:
    """Trainer side of the NCCL path, one per rank: built at the first push (rank 0 opens the
    group with the engines), then one broadcast round per policy version."""

    def __init__(self, handles: list, rank: int, timeout: float, named_parameters, weights):
        self.handles, self.rank, self.timeout = handles, rank, timeout
        self.client = PoolSyncClient(handles, timeout)
        self.source = policy_source(named_parameters, weights)
        self.engine = None

    def _open(self) -> None:
        import ray
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        info = NCCLTrainerInitInfo(
            master_address=ray.util.get_node_ip_address(),
            master_port=free_port(),
            world_size=1 + len(self.handles),
            rank=self.rank,  # rank 0 sends; the others only iterate (ZeRO-3 gathers are collectives)
        )
        self.engine = within(
            lambda: NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=self.source),
            self.timeout,
            "the NCCL weight-transfer group did not form",
        )

    def push(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        if self.engine is None:
            self._open()
        self.client.version = version
        within(self.engine.send_weights, self.timeout, f"the NCCL weight transfer of policy version {version}")
        if self.rank != 0:
            return {}
        return {
            "sync_bytes": float(metadata_bytes(self.source.metadata())),
            "sync_buckets": 0.0,  # vLLM packs the broadcast itself
            "sync_seconds": time.perf_counter() - t0,
            "sync_engine_seconds": self.client.engine_seconds,
        }

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def metadata_bytes(meta) -> int:
    """Bytes of the parameters vLLM's ``ParamMeta`` list declares."""
    import math

    return sum(math.prod(m.shape) * m.dtype.itemsize for m in meta)
