"""Rollout engines for RL: token ids in, sampled response token ids out, and how weights move.

    PPO step:  rollout.generate(prompt ids) ─► score ─► ... ─► update (DeepSpeed) ─► rollout.sync(policy)

The trainer owns the weights (a DeepSpeed engine, ZeRO-partitioned). A rollout engine either
samples *from those weights* (``hf``: nothing to copy, ``sync`` is a no-op) or holds its own
copy and must receive every update before the next rollout (``vllm``):

    sync(named_params)  gets (name, full tensor) pairs in the HF checkpoint's naming, one
                        parameter at a time; under ZeRO-3 each is gathered from its shards
                        (``deepspeed.zero.GatheredParameters``) just before it is handed over,
                        so no rank ever holds the whole model twice. A colocated vLLM loads them
                        with vLLM's in-place ``reload_weights`` (``LLM.collective_rpc``, the
                        checkpoint loader run again on the new tensors). Engines in other
                        processes (``rollout.placement=pool``) get buckets through the object
                        store: pool.py, transfer.py.

Both return, for each prompt, the response ids up to and including EOS (when it came) and no
padding; the PPO loop pads and masks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cai_ray.train.harness import WorkerJob


class RolloutEngine(Protocol):
    #: True when the engine samples from the training weights themselves (no sync needed)
    shares_weights: bool

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[list[int]]: ...

    def sync(self, named_params: Iterable[tuple[str, Any]]) -> None: ...

    def sleep(self) -> None:
        """Free what the engine holds while the trainer updates (wake() or the next call restores)."""

    def wake(self) -> None: ...


def generate_ids(
    module,
    tokenizer,
    prompts: list[list[int]],
    device,
    *,
    max_new_tokens: int,
    synced: bool,
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Response ids of a training module (left-padded batch; sampled at ``temperature``, greedy
    when it is None), each up to and including its EOS. ``synced`` keeps this rank running
    forward passes until every rank's answers have ended: under ZeRO-3 each forward gathers
    the partitioned weights from all ranks, so a rank whose answers end first and stops would
    leave the others waiting in an all-gather (a hang, or ranks out of step). transformers
    only turns it on by itself when an HF DeepSpeed config is active, which
    ``deepspeed.initialize`` does not create."""
    import torch

    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    ids, attn, width = left_pad(prompts, pad, device)
    sampling = (
        dict(do_sample=False)
        if temperature is None
        else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    )
    if seed is not None:
        torch.manual_seed(seed)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                synced_gpus=synced,
                **sampling,
            )
    finally:
        module.train(was_training)
    return [_until_eos(row, eos) for row in out[:, width:].tolist()]


def left_pad(seqs: list[list[int]], pad: int, device):
    """(ids, attention mask, width) of ``seqs`` padded on the left to the longest: the batch
    layout of generation and of the PPO loss's forward passes."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, attn, width


def synced_generation(zero_stage: int) -> bool:
    """Whether generation must keep ranks in step (ZeRO-3 across more than one rank)."""
    import torch.distributed as dist

    return zero_stage == 3 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class HFRollout:
    """``generate`` of the training module itself (DeepSpeed's ZeRO-3 hooks gather the
    partitioned weights layer by layer during the forward passes, every rank in step)."""

    shares_weights = True

    def __init__(self, module, tokenizer, device: str, synced: bool = False):
        self.module = module
        self.tokenizer = tokenizer
        self.device = device
        self.synced = synced

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[list[int]]:
        return generate_ids(
            self.module,
            self.tokenizer,
            prompts,
            self.device,
            max_new_tokens=max_new_tokens,
            synced=self.synced,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )

    def sync(self, named_params: Iterable[tuple[str, Any]]) -> None:
        """Nothing to move: the next rollout samples from the updated weights."""

    def sleep(self) -> None:
        """Nothing to free: the rollout is the training model."""

    def wake(self) -> None:
        """Nothing to restore."""


class VLLMRollout:
    """A vLLM engine colocated with each training worker, in the worker's own process, fed
    the policy's weights after every update.

    In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the model lives here, so
    ``LLM.collective_rpc("reload_weights")`` hands each gathered tensor to vLLM's in-place
    reload without copying it to another process, one engine per rank, on the rank's own device
    (``colocated_args``; checked after start-up). Greedy/sampled text comes from vLLM's
    kernels, the log-probs of the PPO loss from the training model."""

    shares_weights = False

    def __init__(
        self,
        model_path: str,
        gpu_memory_utilization: float,
        max_model_len: int,
        seed: int,
        dtype: str = "auto",
        enforce_eager: bool = True,
        device: str | None = None,
        check_sync: bool = False,
    ):
        import torch

        from cai_ray.engine.vllm import _import_vllm, cpu_env, on_cpu

        vllm = _import_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if on_cpu() and _tied_embeddings(model_path):
            # measured: after reload_weights the CPU build still computes logits with the old
            # (tied) lm_head, so vLLM would sample from a policy that is not the trained one
            raise ValueError(
                "rollout.engine=vllm on CPU cannot sync a model with tied input/output embeddings "
                f"({model_path}: tie_word_embeddings): use rollout.engine=hf, or a GPU"
            )
        if on_cpu():
            # vLLM drops torch to one thread unless OMP_NUM_THREADS is set: keep the
            # worker's own thread count for training
            cpu_env(torch.get_num_threads(), None)
        kw = rl_engine_args(model_path, dtype, gpu_memory_utilization, max_model_len, seed, enforce_eager)
        kw.update(colocated_args(on_cpu(), check_sync))
        self.sleep_level = (1 if check_sync else 2) if kw.get("enable_sleep_mode") else 0
        self.llm = vllm.LLM(**kw)
        if device is not None:
            check_device(self.llm, device)
        self.asleep = False
        self.syncs = 0

    def sleep(self) -> None:
        """Free the engine's GPU memory while the trainer updates (vLLM's sleep mode, GPUs
        only): the KV cache, and at level 2 the weights too, since the next sync rewrites
        them all. Level 1 (weights kept in host memory) when ``rollout.check_sync`` compares
        answers from before the sync. A no-op where vLLM has no sleep mode (CPU)."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[list[int]]:
        from vllm import SamplingParams

        self.wake()
        # one seed per prompt: a prompt's sample does not depend on its batch neighbours
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [
                SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed + i)
                for i in range(len(prompts))
            ],
            use_tqdm=False,
        )
        return [list(o.outputs[0].token_ids) for o in outs]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        self.wake()
        return vllm_greedy(self.llm, prompts, max_new_tokens)

    def sync(self, named_params: Iterable[tuple[str, Any]]) -> None:
        """Every parameter into vLLM's model, through the worker's ``reload_weights`` (vLLM's
        in-place reload for RL: checkpoint-format tensors are loaded layer by layer and
        processed into the kernels' layout again — on CPU the linear weights are repacked
        after loading, so a plain ``model.load_weights`` finds no loader on them). Then the
        cached prefixes go: their KV was computed with the old weights."""
        self.wake()
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": named_params, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.syncs += 1


def rl_engine_args(
    model_path: str, dtype: str, gpu_memory_utilization: float, max_model_len: int, seed: int, enforce_eager: bool
) -> dict[str, Any]:
    """``vllm.LLM`` arguments of an RL rollout engine (colocated or in the pool): one model
    replica, prefix caching (a step's prompts repeat), every sequence the scheduler can hold."""
    from cai_ray.engine.vllm import engine_args

    return engine_args(
        model_path,
        dtype=dtype,
        tensor_parallel_size=1,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        seed=seed,
        enforce_eager=enforce_eager,
        prefix_cache=True,
        max_num_seqs=None,
    )


def vllm_greedy(llm, prompts: list[list[int]], max_new_tokens: int, lora_request=None) -> list[list[int]]:
    """Greedy response ids of a vLLM engine (with an adapter when ``lora_request`` says)."""
    from vllm import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
        use_tqdm=False,
        lora_request=lora_request,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def colocated_args(cpu: bool, check_sync: bool) -> dict[str, Any]:
    """vLLM settings for an engine that shares its process (and GPU) with a training rank.

    On GPUs, vLLM's default single-process executor takes ``cuda:0`` and makes it the
    process's current device, so on a multi-GPU node every rank's engine would land on GPU 0
    and move its trainer there too. vLLM's ``external_launcher`` executor (its documented way
    to run one engine per torchrun-style rank, as verl does for colocated rollouts) takes the
    rank's device from ``LOCAL_RANK``, which Ray Train sets, and joins the existing process
    group. Sleep mode lets the engine free its memory while the trainer updates. The CPU
    build has neither: the default executor (the tested path) and no sleep."""
    if cpu:
        return {}
    return {"distributed_executor_backend": "external_launcher", "enable_sleep_mode": True}


def _worker_device(worker) -> str:
    return str(worker.device)


def check_device(llm, device: str) -> None:
    """Refuse an engine that is not on its trainer's device (``LLM.collective_rpc`` asks
    vLLM's worker; no private attribute is read)."""
    import torch

    got = llm.collective_rpc(_worker_device)
    if any(torch.device(d) != torch.device(device) for d in got):
        raise RuntimeError(
            f"the colocated vLLM rollout engine is on {got}, its trainer on {device}: "
            "each rank's engine must share its trainer's device (check LOCAL_RANK and CUDA_VISIBLE_DEVICES)"
        )
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # vLLM's worker init set it: make sure it is ours


def _tied_embeddings(model_path: str) -> bool:
    import json
    from pathlib import Path

    cfg = Path(model_path) / "config.json"
    return cfg.exists() and bool(json.loads(cfg.read_text()).get("tie_word_embeddings", False))


def gathered_params(module, zero_stage: int, adapters_only: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, full tensor) of every parameter (or of the LoRA adapters' only), gathered one at
    a time under ZeRO-3."""
    import deepspeed

    for name, p in module.named_parameters():
        if adapters_only and "lora_" not in name:
            continue
        if zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                yield name, p.data.detach().clone()
        else:
            yield name, p.data.detach()


def make_rollout(kind: str, module, tokenizer, device: str, model_path: str, job: WorkerJob) -> RolloutEngine:
    if kind == "hf":
        return HFRollout(module, tokenizer, device, synced=synced_generation(job.cfg.zero))
    if kind == "vllm":
        from cai_ray.train.harness import precision

        r = job.cfg.rollout
        return VLLMRollout(
            model_path,
            r.gpu_memory_utilization,
            job.cfg.optim.max_length,
            job.cfg.seed,
            dtype="bfloat16" if precision(job)[1] else "float32",
            enforce_eager=r.enforce_eager,
            device=device,
            check_sync=r.check_sync,
        )
    raise ValueError(f"rollout.engine: unknown engine {kind!r} (hf | vllm)")


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row
