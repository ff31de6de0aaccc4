"""Moving the trainer's weights into rollout engines that live in other processes.

    trainer rank 0                           Ray object store            rollout engine actor
    gathered params ─► buckets (≤ bucket_mb) ─► ray.put(bucket) ─► ref ─► receive(ref): ray.get,
                      one at a time; at most                              vLLM's weight-transfer API:
                      two in flight                                       start_weight_update →
                                                                          update_weights(bucket) … →
                                                                          finish_weight_update(version)

vLLM 0.32's supported way to load new weights into a running engine is its weight-transfer
API (``LLM.init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
``finish_weight_update``, vllm/entrypoints/rl/offline.py), backed by a
``WeightTransferEngine`` chosen by ``weight_transfer_config.backend``. Its built-in backends
move CUDA tensors (NCCL broadcast, CUDA IPC). On CPU none applies, so we register one more
backend through vLLM's own ``WeightTransferEngineFactory.register_engine``: its update chunk
is a list of (name, tensor) pairs this process already holds (the actor fetched them from the
object store), loaded with the same layerwise reload lifecycle vLLM's IPC and NCCL engines
use (``initialize_layerwise_reload`` / ``model.load_weights`` / ``finalize_layerwise_reload``).
No private attribute of vLLM is read.

On GPUs with vLLM engines and full weights, ``rollout.transfer: auto`` moves the weights over
NCCL instead, through vLLM's own NCCL backend and trainer engine (collective.py).

Every transfer has a deadline (``WeightSyncTimeout``): a rollout engine that died or hangs
fails the step with a message, never a silent wait (NCCL broadcasts without a timeout are the
most reported RL hang in OpenRLHF's and verl's trackers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

BACKEND = "cai_ray_objstore"
TRANSFERS = ("auto", "objstore", "nccl")


def transfer_kind(setting: str, engine: str, lora: bool, use_gpu: bool) -> str:
    """objstore | nccl: ``rollout.transfer``, or for ``auto`` NCCL where it applies (GPUs,
    vLLM engines, full weights; collective.py) and the object store elsewhere."""
    if setting != "auto":
        return setting
    return "nccl" if use_gpu and engine == "vllm" and not lora else "objstore"


class WeightSyncTimeout(RuntimeError):
    """A weight transfer to the rollout engines did not finish in time."""


def buckets(named: Iterable[tuple[str, Any]], bucket_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """(name, tensor) pairs grouped into buckets of about ``bucket_bytes`` (a tensor larger
    than a bucket travels alone). Each tensor is moved to the CPU (the object store holds host
    memory) and owns its storage."""
    out: list[tuple[str, Any]] = []
    size = 0
    for name, t in named:
        t = t.detach().to("cpu")
        n = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() > n:
            # a view into a larger buffer (ZeRO-1/2 keep parameters in flat buffers): pickling it
            # would copy the whole buffer, once per parameter (measured: 1.5-2 s instead of 0.1 s
            # for a 49 MB model); a copy of its own travels alone
            t = t.clone()
        if out and size + n > bucket_bytes:
            yield out
            out, size = [], 0
        out.append((name, t))
        size += n
    if out:
        yield out


def bucket_bytes(bucket: list[tuple[str, Any]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


# -- inside the rollout engine's process (vLLM worker side) ---------------------------------------
_registered = False


def register_vllm_backend() -> None:
    """Make ``weight_transfer_config={"backend": BACKEND}`` known to vLLM (once per process,
    before the engine starts: its worker creates the transfer engine when it loads the model)."""
    global _registered
    if _registered:
        return
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    @dataclass
    class InitInfo(WeightTransferInitInfo):
        pass

    @dataclass
    class UpdateInfo(WeightTransferUpdateInfo):
        weights: list = field(default_factory=list)

    class LocalTensorsEngine(WeightTransferEngine):
        """Update chunks are (name, tensor) pairs already in this process."""

        init_info_cls = InitInfo
        update_info_cls = UpdateInfo

        def init_transfer_engine(self, init_info) -> None:
            """Nothing to connect: the tensors arrive through the object store."""

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            import torch

            self.receive_weights(self.parse_update_info(update_info))
            if self.device.type != "cpu":
                torch.accelerator.synchronize()

        def receive_weights(self, update_info) -> None:
            self.model.load_weights([(n, t.to(self.device)) for n, t in update_info.weights])

        def shutdown(self) -> None:
            """Nothing held."""

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, LocalTensorsEngine)
    except ValueError:
        pass  # registered by an earlier import in this process
    _registered = True
