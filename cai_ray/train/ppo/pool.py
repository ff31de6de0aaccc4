"""Where PPO's rollouts come from: the trainer's own process, or a pool of engine actors.

    rollout.placement=colocated   each trainer rank samples in-process (hf: the training
                                  module; vllm: an engine in the rank's process), then trains:
                                  the two never overlap, each gets the whole machine in turn
    rollout.placement=pool        ``rollout.pool_engines`` engine actors on resources of their
                                  own (``rollout.cpus_per_engine`` CPUs, or a GPU each); the
                                  trainers send prompts and receive response ids, the
                                  behaviour log-probs of every sampled token and the policy
                                  version that sampled them

With a pool, ``ppo.mode`` says whether the two sides overlap:

    sync    step t: push weights v_t ─► generate batch t (trainer waits) ─► train ─► v_{t+1}
    async   step t: batch t arrives; batch t+1 … t+max_staleness are already submitted, so
            the engines sample them (with the weights they hold) while the trainers update on
            batch t; then the new weights are pushed (each engine takes them after the
            generation it is running: an actor runs one call at a time)

so in async mode a batch is at most ``ppo.max_staleness`` policy versions old when it is
trained on; ``RolloutSource.next`` checks it against the trainer's version and regenerates a
batch that is older (never trains on it). The PPO loss corrects for the lag (rl_math.
policy_loss: ratio against the trainer's policy at the start of the update, times a truncated
importance weight π_old/π_behaviour).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cai_ray.train.ppo.transfer import WeightSyncTimeout, bucket_bytes, buckets

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One rank's sampled responses for one step."""

    step: int
    responses: list[list[int]]  # ids up to and including EOS, no padding
    logprobs: list[list[float]] | None  # behaviour log-probs per response token (None: in-process rollouts)
    version: int  # the policy version that sampled them
    seconds: float = 0.0  # generation time in the engine
    waited: float = 0.0  # time the trainer waited for them
    regenerated: int = 0  # batches dropped as too stale and sampled again


# -- the engine actor --------------------------------------------------------------------------------
class EngineActor:
    """One rollout engine in a Ray actor of its own (``ray.remote`` is applied in ``start_pool``
    with the resources the config asks for). ``kind``: vllm (vLLM's offline ``LLM``; weights
    through vLLM's weight-transfer API) or hf (transformers ``generate``; weights through
    ``load_state_dict``). With ``lora`` (peft settings) the engine holds the base weights and
    receives the policy's adapters only: vLLM serves them as a ``LoRARequest`` (a new adapter id
    per policy version, written to this actor's own temp folder), hf as a peft model.
    ``transfer``: objstore (buckets arrive through Ray's object store, ``receive``) or nccl
    (vLLM's own NCCL backend: ``init_transfer`` joins the group, ``receive_broadcast`` takes
    a round; see collective.py)."""

    def __init__(
        self,
        kind: str,
        model_path: str,
        dtype: str,
        max_model_len: int,
        seed: int,
        threads: int,
        gpu_mem: float,
        enforce_eager: bool,
        lora: dict | None = None,
        transfer: str = "objstore",
    ):
        import os

        import torch

        self.kind = kind
        self.version = 0
        self.updating = False
        self.lora = lora
        self.lora_request = None  # vllm + lora: the adapter of the current version (None: the base, = version 0)
        self.adapter: dict[str, Any] = {}
        self.adapter_root = None  # vllm + lora: this actor's folder of adapter versions
        self._name_set: set[str] | None = None  # hf: the model's parameter names
        if kind == "vllm":
            from cai_ray.engine.vllm import _import_vllm, cpu_env, on_cpu
            from cai_ray.train.ppo.rollout import rl_engine_args
            from cai_ray.train.ppo.transfer import BACKEND, register_vllm_backend

            vllm = _import_vllm()
            # the engine in this process: tensors are handed over, not copied again
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            if on_cpu():
                cpu_env(threads, None)
            register_vllm_backend()
            kw = rl_engine_args(model_path, dtype, gpu_mem, max_model_len, seed, enforce_eager)
            if lora:
                kw.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora["r"]), max_loras=1)
            else:
                kw["weight_transfer_config"] = {"backend": "nccl" if transfer == "nccl" else BACKEND}
            self.llm = vllm.LLM(**kw)
            if not lora and transfer != "nccl":  # nccl: the trainer opens the group (init_transfer)
                self.llm.init_weight_transfer_engine({"init_info": {}})
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch.set_num_threads(max(1, threads))
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.tok = AutoTokenizer.from_pretrained(model_path)
            if self.tok.pad_token is None:
                self.tok.pad_token = self.tok.eos_token
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32
            )
            if lora:
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
            self.model = model.to(self.device)
            self.model.eval().requires_grad_(False)

    def ready(self) -> int:
        return self.version

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> dict:
        """Sampled response ids, the log-probability of each sampled token under the
        sampling distribution (temperature and top-p applied), and the version that sampled."""
        t0 = time.perf_counter()
        if self.kind == "vllm":
            from vllm import SamplingParams

            outs = self.llm.generate(
                [{"prompt_token_ids": p} for p in prompts],
                [
                    SamplingParams(
                        temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed + i, logprobs=0
                    )
                    for i in range(len(prompts))
                ],
                use_tqdm=False,
                lora_request=self.lora_request,
            )
            responses = [list(o.outputs[0].token_ids) for o in outs]
            logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
        else:
            responses, logprobs = self._hf_generate(prompts, max_new_tokens, temperature, top_p, seed)
        return {
            "responses": responses,
            "logprobs": logprobs,
            "version": self.version,
            "seconds": time.perf_counter() - t0,
        }

    def _hf_generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        import torch

        from cai_ray.train.ppo.rollout import _until_eos, left_pad

        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
        ids, attn, width = left_pad(prompts, pad, self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                pad_token_id=pad,
                eos_token_id=eos,
                return_dict_in_generate=True,
                output_scores=True,
            )
        # scores: the processed logits each token was sampled from (temperature, top-p applied)
        steps = torch.stack(out.scores, 1).float().log_softmax(-1)
        new = out.sequences[:, width:]
        lp = steps.gather(-1, new[..., None]).squeeze(-1)
        responses = [_until_eos(row, eos) for row in new.tolist()]
        return responses, [lp[i, : len(r)].tolist() for i, r in enumerate(responses)]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        if self.kind == "vllm":
            from cai_ray.train.ppo.rollout import vllm_greedy

            return vllm_greedy(self.llm, prompts, max_new_tokens, self.lora_request)
        from cai_ray.train.ppo.rollout import generate_ids

        return generate_ids(self.model, self.tok, prompts, self.device, max_new_tokens=max_new_tokens, synced=False)

    # -- weights (one update: start, receive × buckets, finish) --
    def start_update(self) -> None:
        self.update_started = time.perf_counter()
        if self.kind == "vllm" and not self.lora:
            self.llm.start_weight_update()
        self.adapter = {}
        self.updating = True

    def receive(self, bucket: list[tuple[str, Any]]) -> int:
        """One bucket of (name, tensor) pairs, fetched from the object store by Ray."""
        if not self.updating:
            raise RuntimeError("receive() outside a weight update (start_update first)")
        if self.kind == "vllm" and self.lora:
            self.adapter.update(bucket)  # written out whole at finish_update
        elif self.kind == "vllm":
            self.llm.update_weights({"update_info": {"weights": bucket}})
        else:
            missing = [n for n, _ in bucket if n not in self._names()]
            if missing:
                raise KeyError(f"the rollout engine's model has no parameter {missing[0]!r}")
            self.model.load_state_dict(dict(bucket), strict=False)
        return bucket_bytes(bucket)

    def init_transfer(self, init_info: dict) -> None:
        """nccl: join the trainer's NCCL group (blocks until every member has arrived)."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def receive_broadcast(self, update_info: dict) -> None:
        """nccl: receive one round's broadcast (names, dtypes, shapes in ``update_info``) and
        load it; runs while the trainer sends."""
        if not self.updating:
            raise RuntimeError("receive_broadcast() outside a weight update (start_update first)")
        self.llm.update_weights({"update_info": update_info})

    def _names(self) -> set[str]:
        if self._name_set is None:
            self._name_set = set(self.model.state_dict())
        return self._name_set

    def finish_update(self, version: int) -> float:
        """Load what arrived as ``version``; returns the seconds the engine spent on this
        update (from start_update on: receiving and loading, not waiting in its queue)."""
        if self.kind == "vllm" and self.lora:
            self._load_adapter(version)
        elif self.kind == "vllm":
            self.llm.finish_weight_update(str(version))
            self.llm.reset_prefix_cache()  # cached prefixes' KV came from the old weights
        self.updating = False
        self.version = version
        return time.perf_counter() - self.update_started

    def _load_adapter(self, version: int) -> None:
        """The received adapter as a peft folder in this actor's temp dir, served from now on
        under a new LoRA id (vLLM caches adapters by id; the previous folder goes)."""
        import json
        import shutil
        import tempfile
        from pathlib import Path

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self.adapter_root is None:
            self.adapter_root = Path(tempfile.mkdtemp(prefix="cai-ray-adapter-"))
        folder = self.adapter_root / f"v{version}"
        folder.mkdir(parents=True, exist_ok=True)
        # peft's names carry the adapter's name (".default."); its saved files do not
        state = {k.replace(".default.", "."): v.contiguous() for k, v in self.adapter.items()}
        save_file(state, str(folder / "adapter_model.safetensors"))
        targets = self.lora["target_modules"]
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.lora["r"],
            "lora_alpha": self.lora["lora_alpha"],
            "lora_dropout": self.lora["lora_dropout"],
            "target_modules": sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})
            if targets == "all-linear"
            else targets,
            "bias": "none",
            "fan_in_fan_out": False,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        old = self.lora_request
        self.lora_request = LoRARequest(f"policy-v{version}", version, str(folder))
        self.adapter = {}
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's LoRAConfig.max_lora_rank choices


def vllm_lora_rank(r: int) -> int:
    """vLLM's smallest allowed max_lora_rank that holds rank ``r``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"lora.r={r}: vLLM serves adapters of rank {VLLM_LORA_RANKS[-1]} at most")


# -- the trainer's side ------------------------------------------------------------------------------
def start_pool(
    r,
    model_path: str,
    dtype: str,
    max_model_len: int,
    seed: int,
    use_gpu: bool,
    lora: dict | None = None,
    transfer: str = "objstore",
) -> list:
    """``r.pool_engines`` engine actors (``r`` is the RolloutSection); returns their handles
    once every engine has loaded its model. ``lora``: peft settings (adapters only travel);
    ``transfer``: objstore | nccl (``transfer_kind``)."""
    import ray

    threads = max(1, int(r.cpus_per_engine))
    actor = ray.remote(EngineActor).options(
        num_cpus=r.cpus_per_engine, num_gpus=1 if use_gpu else 0, max_concurrency=1, max_restarts=0
    )
    handles = [
        actor.remote(
            r.engine,
            model_path,
            dtype,
            max_model_len,
            seed + i,
            threads,
            r.gpu_memory_utilization,
            r.enforce_eager,
            lora,
            transfer,
        )
        for i in range(r.pool_engines)
    ]
    get_within([h.ready.remote() for h in handles], r.start_timeout_s, "the rollout engines did not start")
    return handles


def get_within(refs, timeout: float, what: str):
    """ray.get with a deadline and a message that says what was waited for."""
    import ray

    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    if pending:
        raise WeightSyncTimeout(f"{what} within {timeout:g} s ({len(pending)} of {len(refs)} calls pending)")
    return ray.get(list(refs))


def push_weights(
    handles: list, named: Iterable[tuple[str, Any]], version: int, bucket_mb: float, timeout: float, sender: bool
) -> dict[str, float]:
    """Stream the policy's parameters to every engine: buckets of ``bucket_mb`` through the
    object store, at most two in flight per engine, each call under ``timeout`` seconds.
    Every rank iterates ``named`` (under ZeRO-3 each parameter's gather is a collective);
    only the ``sender`` (rank 0) puts buckets. Returns bytes, buckets and seconds."""
    import ray

    t0 = time.perf_counter()
    if not sender:
        for _ in named:
            pass
        return {}
    get_within([h.start_update.remote() for h in handles], timeout, "the rollout engines did not start a weight update")
    sent = n = 0
    pending: list = []
    for bucket in buckets(named, int(bucket_mb * 2**20)):
        ref = ray.put(bucket)
        pending.append([h.receive.remote(ref) for h in handles])
        sent += bucket_bytes(bucket)
        n += 1
        del bucket, ref
        if len(pending) > 2:
            get_within(pending.pop(0), timeout, f"the rollout engines did not take weight bucket {n - 2}")
    for i, calls in enumerate(pending):
        get_within(calls, timeout, f"the rollout engines did not take weight bucket {n - len(pending) + i + 1}")
    engine_seconds = get_within(
        [h.finish_update.remote(version) for h in handles],
        timeout,
        "the rollout engines did not finish the weight update",
    )
    return {
        "sync_bytes": float(sent),
        "sync_buckets": float(n),
        "sync_seconds": time.perf_counter() - t0,  # the trainer's wait, queueing behind a generation included
        "sync_engine_seconds": max(engine_seconds),  # the engines' own time receiving and loading
    }


class RolloutSource:
    """A trainer rank's rollouts from the pool, in ``sync`` or ``async`` mode (see the module
    docstring). ``submit(step)`` returns the call's ObjectRef; ``engines`` are the pool's
    handles; ``version()`` the trainer's current policy version."""

    def __init__(self, handles: list, rank: int, mode: str, max_staleness: int, timeout: float, submit):
        self.handles = handles
        self.engine = handles[rank % len(handles)]
        self.mode = mode
        self.max_staleness = max_staleness if mode == "async" else 0
        self.timeout = timeout
        self._submit = submit  # (engine, step) -> ObjectRef of EngineActor.generate
        self.inflight: dict[int, Any] = {}

    def prefetch(self, step: int, last: int) -> None:
        """Async mode: submit the batches after ``step`` the staleness bound allows (and that exist)."""
        if self.mode != "async":
            return
        for s in range(step + 1, min(step + self.max_staleness, last - 1) + 1):
            if s not in self.inflight:
                self.inflight[s] = self._submit(self.engine, s)

    def next(self, step: int, version: int) -> Rollout:
        """Batch ``step``, sampled by a policy at most ``max_staleness`` versions behind
        ``version`` (a staler one is dropped and sampled again with the engine's current weights)."""

        t0 = time.perf_counter()
        regenerated = 0
        ref = self.inflight.pop(step, None) or self._submit(self.engine, step)
        while True:
            out = get_within([ref], self.timeout, f"the rollout engine did not return batch {step}")[0]
            lag = version - out["version"]
            if lag <= self.max_staleness:
                break
            log.warning(
                "rollout batch %d was sampled by policy version %d, %d behind the trainer's %d "
                "(ppo.max_staleness=%d): dropped, sampling it again",
                step,
                out["version"],
                lag,
                version,
                self.max_staleness,
            )
            regenerated += 1
            if regenerated > 3:
                raise RuntimeError(
                    f"rollout batch {step}: the engines still hold policy version {out['version']} after "
                    f"{regenerated} tries, the trainer is at {version}: the weight sync is not reaching them"
                )
            ref = self._submit(self.engine, step)
        return Rollout(
            step=step,
            responses=out["responses"],
            logprobs=out["logprobs"],
            version=out["version"],
            seconds=out["seconds"],
            waited=time.perf_counter() - t0,
            regenerated=regenerated,
        )

    def drop_inflight(self) -> None:
        self.inflight.clear()
