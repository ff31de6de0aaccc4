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
                        checkpoint loader run again on the new tensors); a remote vLLM server would receive them
                        through an NCCL group (OpenRLHF's design) — not built.

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


class HFRollout:
    """``generate`` of the training module itself (DeepSpeed's ZeRO-3 hooks gather the
    partitioned weights layer by layer during the forward passes)."""

    shares_weights = True

    def __init__(self, module, tokenizer, device: str):
        self.module = module
        self.tokenizer = tokenizer
        self.device = device

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[list[int]]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        torch.manual_seed(seed)
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            out = self.module.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        self.module.train(was_training)
        return [_until_eos(row, self.tokenizer.eos_token_id) for row in out[:, width:].tolist()]

    def sync(self, named_params: Iterable[tuple[str, Any]]) -> None:
        """Nothing to move: the next rollout samples from the updated weights."""


class VLLMRollout:
    """A vLLM engine colocated with each training worker, in the worker's own process, fed
    the policy's weights after every update.

    In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the model lives here, so
    ``LLM.collective_rpc("reload_weights")`` hands each gathered tensor to vLLM's in-place
    reload without copying it to another process; vLLM joins the worker's existing process group
    (Ray Train's) as its world, one engine per rank. Greedy/sampled text comes from vLLM's
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
    ):
        import torch

        from cai_ray.engine.vllm import _import_vllm, cpu_env, engine_args, on_cpu

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
        kw = engine_args(
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
        self.llm = vllm.LLM(**kw)
        self.syncs = 0

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[list[int]]:
        from vllm import SamplingParams

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
        from vllm import SamplingParams

        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
            use_tqdm=False,
        )
        return [list(o.outputs[0].token_ids) for o in outs]

    def sync(self, named_params: Iterable[tuple[str, Any]]) -> None:
        """Every parameter into vLLM's model, through the worker's ``reload_weights`` (vLLM's
        in-place reload for RL: checkpoint-format tensors are loaded layer by layer and
        processed into the kernels' layout again — on CPU the linear weights are repacked
        after loading, so a plain ``model.load_weights`` finds no loader on them). Then the
        cached prefixes go: their KV was computed with the old weights."""
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": named_params, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.syncs += 1


def _tied_embeddings(model_path: str) -> bool:
    import json
    from pathlib import Path

    cfg = Path(model_path) / "config.json"
    return cfg.exists() and bool(json.loads(cfg.read_text()).get("tie_word_embeddings", False))


def gathered_params(module, zero_stage: int) -> Iterator[tuple[str, Any]]:
    """(name, full tensor) of every parameter, gathered one at a time under ZeRO-3."""
    import deepspeed

    for name, p in module.named_parameters():
        if zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                yield name, p.data.detach().clone()
        else:
            yield name, p.data.detach()


def make_rollout(kind: str, module, tokenizer, device: str, model_path: str, job: WorkerJob) -> RolloutEngine:
    if kind == "hf":
        return HFRollout(module, tokenizer, device)
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
        )
    raise ValueError(f"rollout.engine: unknown engine {kind!r} (hf | vllm)")


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row
