"""Rollout engines for RL: token ids in, sampled response token ids out, and how weights move.

    PPO step:  rollout.generate(prompt ids) ─► score ─► ... ─► update (DeepSpeed) ─► rollout.sync(policy)

The trainer owns the weights (a DeepSpeed engine, ZeRO-partitioned). A rollout engine either
samples *from those weights* (``hf``: nothing to copy, ``sync`` is a no-op) or holds its own
copy and must receive every update before the next rollout (``vllm``):

    sync(named_params)  gets (name, full tensor) pairs in the HF checkpoint's naming, one
                        parameter at a time; under ZeRO-3 each is gathered from its shards
                        (``deepspeed.zero.GatheredParameters``) just before it is handed over,
                        so no rank ever holds the whole model twice. A colocated vLLM loads them
                        with its model's ``load_weights`` (the same call that reads a
                        checkpoint); a remote vLLM server would receive them through an NCCL
                        group (OpenRLHF's design) — not built.

Both return, for each prompt, the response ids up to and including EOS (when it came) and no
padding; the PPO loop pads and masks.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol


class RolloutEngine(Protocol):
    #: True when the engine samples from the training weights themselves (no sync needed)
    shares_weights: bool

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[list[int]]: ...

    def sync(self, named_params: Iterable[tuple[str, Any]]) -> None: ...


class HFRollout:
    """``generate`` of the training module itself (DeepSpeed's ZeRO-3 hooks gather the
    partitioned weights layer by layer during the forward passes)."""

    shares_weights = True

    def __init__(self, module, tokenizer, device: str):
        self.module = module
        self.tokenizer = tokenizer
        self.device = device

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[list[int]]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        torch.manual_seed(seed)
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            out = self.module.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature,
                                       top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                       eos_token_id=self.tokenizer.eos_token_id)
        self.module.train(was_training)
        return [_until_eos(row, self.tokenizer.eos_token_id) for row in out[:, width:].tolist()]

    def sync(self, named_params: Iterable[tuple[str, Any]]) -> None:
        """Nothing to move: the next rollout samples from the updated weights."""


class VLLMRollout:
    """A vLLM engine colocated with each training worker (its own GPU share), fed the policy's
    weights after every update. Needs vLLM and a GPU; not exercised on CPU."""

    shares_weights = False

    def __init__(self, model_path: str, gpu_memory_utilization: float, max_model_len: int, seed: int):
        import os

        from cai_ray.engine.vllm import _import_vllm

        vllm = _import_vllm()
        # in-process engine: its model object is reachable for load_weights
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = vllm.LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, enable_prefix_caching=True)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def sync(self, named_params: Iterable[tuple[str, Any]]) -> None:
        model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        model.load_weights(named_params)
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights


def gathered_params(module, zero_stage: int) -> Iterator[tuple[str, Any]]:
    """(name, full tensor) of every parameter, gathered one at a time under ZeRO-3."""
    import deepspeed

    for name, p in module.named_parameters():
        if zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                yield name, p.data.detach().clone()
        else:
            yield name, p.data.detach()


def make_rollout(kind: str, module, tokenizer, device: str, model_path: str, c: dict[str, Any]) -> RolloutEngine:
    if kind == "hf":
        return HFRollout(module, tokenizer, device)
    if kind == "vllm":
        return VLLMRollout(model_path, c["rollout"]["gpu_memory_utilization"], c["max_length"], c["seed"])
    raise ValueError(f"rollout.engine: unknown engine {kind!r} (hf | vllm)")


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row
