"""RL-CAI with PPO: the SFT policy optimised against the preference model, near the SFT policy.

    prompts ─► harness: TorchTrainer(N workers, DeepSpeed ZeRO) ─► OUTPUT/model (policy), OUTPUT/value,
                                                                    metrics.json, ppo.png, samples.jsonl
    each worker, each step (named, timed phases):
        rollout    sample a response per prompt from the policy (rollout engine: hf | vllm)
        score      preference model (or reward function, or the AI labeler) on prompt + response
        reference  log-probs of the responses under the frozen reference (SFT) policy
        values     log-probs under the rollout policy and the value model's per-token values
        advantages per-token reward = score on the last real token - β·KL; GAE; whitening
                   (statistics over all workers)
        update     ppo_epochs × minibatches: clipped policy loss, clipped value loss
        sync       (vllm rollouts) the updated weights into the rollout engine; with
                   rollout.check_sync, vLLM's greedy answers checked against the policy's own
        monitor    every N steps: refusal rate on benign probes (greedy)
        checkpoint every N steps: both DeepSpeed engines + loop state, reported to Ray Train

Four models per worker (OpenRLHF's layout): policy and value train under DeepSpeed (ZeRO-2 or
-3, own optimizers); the reference and the reward model are frozen (partitioned too under
ZeRO-3). The value model starts from the preference model (its score head predicts returns),
or, with a reward function or the labeler, from the policy with a zero head. Responses end at
their first EOS (kept, it is a real action); everything after it is masked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from cai_ray.batch.readers import load_rows, prompt_row, reject
from cai_ray.core.context import context_overflow
from cai_ray.train import harness

log = logging.getLogger(__name__)

PHASES = ("rollout", "score", "reference", "values", "advantages", "update", "sync", "monitor", "checkpoint")
SYNC_CHECK_PROMPTS = 4  # prompts per worker whose greedy answers check a weight sync
SAMPLES_PER_STEP = 4  # responses written to samples.jsonl per step (rank 0's first ones)


# -- rows -----------------------------------------------------------------------------------
def prompt_rows(cfg, tokenizer) -> tuple[list[dict], list[dict]]:
    """Usable prompt rows and rejects (malformed, too long for prompt + response, no reference
    where d-RLAIF needs one). Prompt contents are ``neutralise``d for the policy's tokenizer:
    TRL's GRPO/RLOO trainers tokenise these rows themselves, with special-token parsing."""
    from cai_ray.engine import neutralise_messages

    rows, rejects = load_rows(cfg.data, prompt_row)
    keep = []
    for row in rows:
        prompt = neutralise_messages(row["prompt"], tokenizer)
        n = len(_encode(tokenizer, prompt))
        # optim.max_length is what the trainer holds: prompt + response
        why = context_overflow("the policy", n, cfg.rollout.max_new_tokens, cfg.optim.max_length)
        if not why and cfg.reward.kind == "labeler" and cfg.reward.reference == "field" and not row["reference"]:
            why = "reward.reference=field, but the row has no 'reference' answer"
        if why:
            rejects.append(reject("data", None, {"id": row["id"], **row}, why))
        else:
            keep.append({**row, "prompt": prompt})
    return keep, rejects


def _encode(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for the policy; the contents are neutralised, since the templated text is
    tokenised with special-token parsing and a prompt holding ``<|im_end|>`` would forge turns."""
    from cai_ray.engine import neutralise_messages

    messages = neutralise_messages(messages, tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bf16():
    import torch

    return torch.bfloat16


def collective_device(own):
    """Where a tensor handed to a collective must live: NCCL (Ray Train's backend on GPUs)
    takes GPU tensors only and refuses CPU ones at the first reduction; gloo (CPU) takes CPU
    tensors. ``own`` is this rank's training device."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(own)
    return torch.device("cpu")


# -- the job --------------------------------------------------------------------------------
def train_rl(cfg) -> dict[str, Any]:
    """Run RL as an ``RLTrainConfig`` says (PPO here; GRPO/RLOO through TRL); returns the manifest."""
    from transformers import AutoTokenizer

    from cai_ray.config import to_dict
    from cai_ray.models import model_info, resolve_model
    from cai_ray.train.data import TrainDataError
    from cai_ray.train.ppo.reward import load_function

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    rows, rejects = prompt_rows(cfg, tok)
    if not rows:
        raise TrainDataError(f"{cfg.data}: no usable prompts ({len(rejects)} rejected: see the reasons in rejects)")
    r = cfg.reward
    reward_info = {
        "source": r.kind,
        "model": model_info(r.model) if r.kind == "model" else None,
        "function": r.function if r.kind == "function" else None,
        "labeler": r.labeler.model if r.kind == "labeler" else None,
    }
    if r.kind == "labeler":
        from cai_ray.core.constitution import load_constitution

        reward_info["constitution_sha256"] = load_constitution(r.constitution).sha256
    if r.kind == "function":
        load_function(r.function)  # a missing file or name fails here, before any worker starts
    plain = {name: to_dict(getattr(cfg, name)) for name in ("reward", "rollout", "ppo", "monitor")}
    fingerprint = {"algo": cfg.algo, **plain}
    fingerprint["ppo"] = {k: v for k, v in plain["ppo"].items() if k != "steps"}  # steps may grow on resume
    return harness.run(
        cfg.algo,  # ppo runs its own loop; grpo/rloo TRL's trainers in the harness's
        cfg,
        rows,
        rejects,
        loop=ppo_loop if cfg.algo == "ppo" else None,
        stage="ppo",  # the command, `train ppo`, whatever the algorithm (the manifest's config says which)
        fingerprint_extra=fingerprint,
        manifest_extra={"reward": reward_info, "algo": cfg.algo},
    )


# -- on every worker ------------------------------------------------------------------------
class Phases:
    """Wall time per named phase of one step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def ds_config(job: harness.WorkerJob, micro_batch: int, world: int, frozen: bool = False) -> dict[str, Any]:
    """A concrete DeepSpeed config (no HF Trainer fills "auto" here): ZeRO stage, batch, precision.
    A frozen model gets ZeRO-3 partitioning when training uses ZeRO-3, else none."""
    from cai_ray.train.zero import zero_config

    _, bf16 = harness.precision(job)
    stage = job.cfg.zero
    if frozen:
        zero = {"stage": 3 if stage == 3 else 0}
    else:
        zero = (zero_config(stage, job.cfg.offload) or {"zero_optimization": {"stage": 0}})["zero_optimization"]
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if "offload_optimizer" in zero:
        # the optimizer is ours (torch AdamW, passed to deepspeed.initialize): DeepSpeed
        # refuses a client optimizer with offload unless told to accept it. Its own CPU Adam
        # would be faster but JIT-compiles an extension on every new machine.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


class Worker:
    """One Ray Train worker's models and the step; ``ppo_loop`` drives it."""

    def __init__(self, job: harness.WorkerJob):
        import deepspeed
        import ray.train
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from cai_ray.models import resolve_model
        from cai_ray.train.ppo.reward import RewardScorer
        from cai_ray.train.ppo.rollout import make_rollout

        self.job = job
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        cuda, bf16 = harness.precision(job)
        if cuda:
            from ray.train.torch import get_device

            self.device = get_device()
        else:
            self.device = torch.device("cpu")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        torch.manual_seed(job.cfg.seed)
        path = resolve_model(job.cfg.model)
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        rw = job.cfg.reward
        kind = self.reward_kind = rw.kind
        mb, lr = job.cfg.optim.per_worker_batch_size, job.cfg.optim.learning_rate

        policy = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        policy.generation_config.pad_token_id = self.tok.pad_token_id
        self.lora = harness.lora_config(job, "CAUSAL_LM")
        if self.lora is not None:
            from peft import get_peft_model

            # adapters only: the base weights are frozen, the optimizer holds the adapters' state,
            # and only the adapters travel to the rollout engines
            policy = get_peft_model(policy, self.lora)
        value_path = resolve_model(rw.model) if kind == "model" else path
        value = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, dtype=self.dtype)
        value.config.pad_token_id = self.tok.pad_token_id
        if kind != "model":
            with torch.no_grad():
                self._value_head(value).weight.zero_()  # a fresh head: V = 0 until it learns returns
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).eval().requires_grad_(False)

        self.policy, *_ = deepspeed.initialize(
            model=policy,
            optimizer=torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0),
            config=ds_config(job, mb, self.world),
        )
        self.value, *_ = deepspeed.initialize(
            model=value,
            optimizer=torch.optim.AdamW(value.parameters(), lr=job.cfg.ppo.value_learning_rate, weight_decay=0.0),
            config=ds_config(job, mb, self.world),
        )
        self.ref = self._frozen(ref) if job.cfg.zero == 3 else ref.to(self.device)
        from cai_ray.train.ppo.rollout import synced_generation

        self.synced_generation = synced_generation(job.cfg.zero)
        self.version = 0  # policy version: updates applied (the rollout engines' weights carry it)
        self.pooled = job.cfg.rollout.placement == "pool"
        if self.pooled:
            self.rollout = None
            self.source = self._start_pool(path)
        else:
            self.rollout = make_rollout(
                job.cfg.rollout.engine, self.policy.module, self.tok, str(self.device), path, job
            )
        self.scorer = RewardScorer(
            rw,
            job.base_dir,
            device=str(self.device),
            seed=job.cfg.seed,
            reference_answer=self.reference_answers,
            dtype=self.dtype,
            prepare=self._frozen if job.cfg.zero == 3 else None,
            cache_references=not self.synced_generation,
        )
        from cai_ray.core.rl_math import AdaptiveKL
        from cai_ray.train.ppo.monitors import load_probes

        self.kl = AdaptiveKL(job.cfg.ppo.kl_coef, job.cfg.ppo.adaptive_kl, job.cfg.ppo.kl_horizon)
        self.probes = load_probes(job.cfg.monitor.probe)
        rows = job.rows
        self.rows = rows[self.rank :: self.world] or rows  # every worker needs prompts, even with few rows
        self.per_worker = job.cfg.ppo.rollout_batch // self.world
        self.step = 0
        self.history: list[dict] = []

    def _start_pool(self, path: str):
        """Rank 0 starts the engine actors; every rank gets their handles (a broadcast)."""
        import torch.distributed as dist

        from cai_ray.train.ppo.pool import RolloutSource, start_pool

        job, r = self.job, self.job.cfg.rollout
        handles = None
        if self.rank == 0:
            dtype = "bfloat16" if self.dtype == _bf16() else "float32"
            lora = None if self.lora is None else harness.lora_dict(job)
            handles = start_pool(r, path, dtype, job.cfg.optim.max_length, job.cfg.seed, bool(job.use_gpu), lora)
        if self.world > 1:
            box = [handles]
            dist.broadcast_object_list(box, src=0)
            handles = box[0]
        self.pool_handles = handles
        return RolloutSource(
            handles, self.rank, job.cfg.ppo.mode, job.cfg.ppo.max_staleness, r.sync_timeout_s, self._submit
        )

    def _submit(self, engine, step: int):
        """Ask ``engine`` for this rank's batch ``step`` (an ObjectRef)."""
        r = self.job.cfg.rollout
        prompts = [_encode(self.tok, row["prompt"]) for row in self.batch_rows(step)]
        return engine.generate.remote(prompts, r.max_new_tokens, r.temperature, r.top_p, self._seed(step))

    def _seed(self, step: int) -> int:
        return hash((self.job.cfg.seed, step, self.rank)) % 2**31

    def push_weights(self) -> dict[str, float]:
        """The policy (version ``self.version``) into every pool engine; every rank takes part
        (ZeRO-3 gathers), rank 0 sends; ranks leave together."""
        from cai_ray.train.ppo.pool import push_weights
        from cai_ray.train.ppo.rollout import gathered_params

        r = self.job.cfg.rollout
        stats = push_weights(
            self.pool_handles,
            gathered_params(self.policy.module, self.job.cfg.zero, adapters_only=self.lora is not None),
            self.version,
            r.sync_bucket_mb,
            r.sync_timeout_s,
            sender=self.rank == 0,
        )
        self._all_sum([0.0])  # a barrier: no rank samples again before the engines hold the new weights
        return stats

    def close(self) -> None:
        """Stop the pool's engines (they would otherwise live until this worker's process ends)."""
        if self.pooled and self.rank == 0:
            import ray

            for h in self.pool_handles:
                ray.kill(h)

    def _frozen(self, model):
        """A frozen model partitioned like the trained ones (ZeRO-3: each rank holds a shard;
        every forward gathers it, so every rank must run the same forwards)."""
        import deepspeed

        engine, *_ = deepspeed.initialize(
            model=model, config=ds_config(self.job, self.job.cfg.optim.per_worker_batch_size, self.world, frozen=True)
        )
        engine.eval()  # DeepSpeedEngine.eval() returns None, not the engine
        return engine

    @staticmethod
    def _value_head(model):
        return model.score if hasattr(model, "score") else model.classifier

    # -- forward passes ----------------------------------------------------------------------
    def _positions(self, attn):
        return (attn.cumsum(-1) - 1).clamp(min=0)

    def logprobs(self, model, ids, attn, p_len: int, with_logits: bool = False):
        """Log-probabilities of the response tokens (at the sampling temperature) and, when
        asked, the response logits (for entropy)."""
        import torch

        # logits for the response positions only (and the last prompt token, which predicts the
        # first response token): [batch, response, vocab] instead of [batch, prompt + response,
        # vocab] — with a 150k vocabulary the prompt's logits alone can outweigh the model
        keep = ids.shape[1] - p_len + 1
        out = model(input_ids=ids, attention_mask=attn, position_ids=self._positions(attn), logits_to_keep=keep).logits
        logits = out[:, :-1].float() / self.job.cfg.rollout.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p_len:, None]).squeeze(-1)
        return (logp, logits) if with_logits else logp

    def values_of(self, ids, attn, p_len: int):
        """V(s_t) before each response token: the value head on every position's hidden state."""
        m = self.value.module
        backbone = getattr(m, m.base_model_prefix)
        h = backbone(input_ids=ids, attention_mask=attn, position_ids=self._positions(attn)).last_hidden_state
        return self._value_head(m)(h).squeeze(-1)[:, p_len - 1 : -1].float()

    def _chunks(self, n: int):
        mb = self.job.cfg.optim.per_worker_batch_size
        return [slice(i, min(i + mb, n)) for i in range(0, n, mb)]

    def reference_answers(self, prompts: list[list[dict]]) -> list[str]:
        """d-RLAIF reference answers: the frozen reference policy's greedy answers."""
        module = self.ref.module if hasattr(self.ref, "module") else self.ref
        out = []
        for sl in self._chunks(len(prompts)):
            enc = [_encode(self.tok, p) for p in prompts[sl]]
            ids = self._generate(module, enc, self.job.cfg.rollout.max_new_tokens)
            out += self.tok.batch_decode(ids, skip_special_tokens=True)
        return out

    def _generate(self, module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy response ids of ``module`` (ranks kept in step under ZeRO-3)."""
        from cai_ray.train.ppo.rollout import generate_ids

        return generate_ids(
            module, self.tok, prompts, self.device, max_new_tokens=max_new_tokens, synced=self.synced_generation
        )

    def _left_pad(self, seqs: list[list[int]]):
        from cai_ray.train.ppo.rollout import left_pad

        return left_pad(seqs, self.tok.pad_token_id, self.device)

    # -- one step -----------------------------------------------------------------------------
    def batch_rows(self, step: int) -> list[dict]:
        """This worker's prompts for ``step``: its shard, in a seeded order per pass."""
        n, k = len(self.rows), self.per_worker
        out = []
        for j in range(step * k, step * k + k):
            epoch, i = divmod(j, n)
            order = list(range(n))
            random.Random(f"{self.job.cfg.seed}:{self.rank}:{epoch}").shuffle(order)
            out.append(self.rows[order[i]])
        return out

    def run_step(self, step: int) -> dict[str, Any]:
        import torch

        from cai_ray.core import rl_math as m

        job, ppo, ph = self.job, self.job.cfg.ppo, Phases()
        rows = self.batch_rows(step)
        prompts = [_encode(self.tok, r["prompt"]) for r in rows]

        t_step = time.perf_counter()
        pool_info: dict[str, float] = {}
        behaviour = None
        with ph("rollout"):
            if self.pooled:
                got = self.source.next(step, self.version)
                self.source.prefetch(step, ppo.steps)  # async: the next batches sample while this one trains
                responses, behaviour = got.responses, got.logprobs
                pool_info = {
                    "staleness": float(self.version - got.version),
                    "rollout_engine_seconds": got.seconds,
                    "rollout_wait_seconds": got.waited,
                    "regenerated_stale": float(got.regenerated),
                }
            else:
                responses = self.rollout.generate(
                    prompts,
                    job.cfg.rollout.max_new_tokens,
                    job.cfg.rollout.temperature,
                    job.cfg.rollout.top_p,
                    seed=self._seed(step),
                )
            if behaviour is not None:  # an empty answer gets EOS below: no behaviour log-prob for it
                behaviour = [lp if r else [] for r, lp in zip(responses, behaviour)]
            responses = [r or [self.tok.eos_token_id] for r in responses]  # an empty answer still ends
            p_ids, p_attn, p_len = self._left_pad(prompts)
            t_len = max(len(r) for r in responses)
            pad = self.tok.pad_token_id
            r_ids = torch.tensor([r + [pad] * (t_len - len(r)) for r in responses], device=self.device)
            mask = torch.tensor([[1.0] * len(r) + [0.0] * (t_len - len(r)) for r in responses], device=self.device)
            ids = torch.cat([p_ids, r_ids], 1)
            attn = torch.cat([p_attn, mask.long()], 1)
            texts = self.tok.batch_decode(responses, skip_special_tokens=True)
            if self.rollout is not None:
                self.rollout.sleep()  # a colocated vLLM frees its KV cache (and weights) for the update

        with ph("score"):
            scores = torch.tensor(
                self.scorer.score(
                    [r["id"] for r in rows],
                    [r["prompt"] for r in rows],
                    texts,
                    [len(r) for r in responses],
                    [r["reference"] for r in rows],
                ),
                device=self.device,
                dtype=torch.float32,
            )

        with torch.no_grad():
            with ph("reference"):
                ref_logp = torch.cat([self.logprobs(self.ref, ids[s], attn[s], p_len) for s in self._chunks(len(rows))])
            with ph("values"):
                old_logp = torch.cat(
                    [self.logprobs(self.policy, ids[s], attn[s], p_len) for s in self._chunks(len(rows))]
                )
                old_values = torch.cat([self.values_of(ids[s], attn[s], p_len) for s in self._chunks(len(rows))])
            with ph("advantages"):
                kl = m.kl_per_token(old_logp, ref_logp, ppo.kl_estimator) * mask
                beta = self.kl.value
                rewards = m.token_rewards(scores, kl, beta, mask)
                adv, returns = m.gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
                if ppo.whiten_advantages:
                    adv = self._whiten_all(adv, mask)
                is_weights, is_stats = None, {}
                if behaviour is not None:
                    b = torch.tensor(
                        [lp + [0.0] * (t_len - len(lp)) for lp in behaviour], device=self.device, dtype=old_logp.dtype
                    )
                    known = torch.tensor(
                        [[1.0] * len(lp) + [0.0] * (t_len - len(lp)) for lp in behaviour], device=self.device
                    ).bool()
                    b = torch.where(known, b, old_logp)  # no behaviour log-prob: weight 1
                    is_weights, st = m.behaviour_weights(old_logp, b, mask, ppo.is_cap)
                    is_stats = {k: v.item() for k, v in st.items()}

        with ph("update"):
            stats = self.update(
                ids,
                attn,
                p_len,
                mask,
                old_logp,
                old_values,
                adv,
                returns,
                train_policy=step >= ppo.critic_warmup_steps,
                is_weights=is_weights,
            )
        self.version += 1
        sync_check = {}
        check = prompts[:SYNC_CHECK_PROMPTS] if job.cfg.rollout.check_sync else None
        if self.pooled:
            with ph("sync"):
                sync_stats = self.push_weights()
                if check:
                    sync_check = self.pool_sync_check(check)
        elif not self.rollout.shares_weights:
            with ph("sync"):
                sync_check = self.sync_rollout(check)
        seq_kl = (kl.sum(1)).mean().item()
        self.kl.update(self._mean_all(seq_kl), ppo.rollout_batch)

        local = {
            "reward": scores.mean().item(),
            "kl": seq_kl,
            "entropy": stats["entropy"],
            "clipfrac": stats["clipfrac"],
            "approx_kl": stats["approx_kl"],
            "policy_loss": stats["policy_loss"],
            "value_loss": stats["value_loss"],
            "vf_clipfrac": stats["vf_clipfrac"],
            "response_length": mask.sum(1).mean().item(),
            "value_mean": m.masked_mean(old_values, mask).item(),
            "return_mean": m.masked_mean(returns, mask).item(),
            "ended_share": sum(1 for r in responses if r[-1] == self.tok.eos_token_id) / len(responses),
            **sync_check,
            **is_stats,
            **pool_info,
        }
        metrics = {k: self._mean_all(v) for k, v in local.items()}
        metrics.update(step=step + 1, kl_coef=beta, reward_std=self._std_all(scores), policy_version=self.version)
        if self.pooled:
            metrics["staleness_max"] = self._max_all(pool_info["staleness"])
            for k in ("sync_bytes", "sync_buckets", "sync_seconds"):
                metrics[k] = self._sum_all(sync_stats.get(k, 0.0))  # rank 0 sends
        if self.reward_kind == "labeler":
            metrics["labeler_invalid"] = self._sum_all(self.scorer.invalid)
        all_texts = self._gather(texts)
        from cai_ray.train.ppo.monitors import top_ngram_share

        metrics["top_ngram_share"] = top_ngram_share(all_texts, job.cfg.monitor.ngram, job.cfg.monitor.top_ngrams)
        last = step + 1 == ppo.steps
        if (step + 1) % job.cfg.monitor.every == 0 or step == 0 or last:
            with ph("monitor"):
                metrics["probe_refusal_rate"] = self.probe_refusal_rate()
        metrics["seconds"] = {k: round(v, 4) for k, v in ph.seconds.items()}
        metrics["step_seconds"] = round(time.perf_counter() - t_step, 4)
        metrics["samples"] = [
            {"prompt": r["prompt"][-1]["content"], "response": t, "score": s}
            for r, t, s in zip(rows, texts, scores.tolist())
        ][:SAMPLES_PER_STEP]
        return metrics

    def update(
        self, ids, attn, p_len, mask, old_logp, old_values, adv, returns, train_policy: bool, is_weights=None
    ) -> dict:
        import torch

        from cai_ray.core import rl_math as m

        ppo = self.job.cfg.ppo
        sums: dict[str, float] = {}
        n = 0
        gen = torch.Generator().manual_seed(self.job.cfg.seed)
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(ids.shape[0], generator=gen).to(self.device)
            for sl in self._chunks(ids.shape[0]):
                idx = order[sl]
                mb_mask = mask[idx]
                logp, logits = self.logprobs(self.policy, ids[idx], attn[idx], p_len, with_logits=True)
                w = None if is_weights is None else is_weights[idx]
                pl, st = m.policy_loss(logp, old_logp[idx], adv[idx], mb_mask, ppo.clip_range, weights=w)
                if train_policy:
                    self.policy.backward(pl)
                    self.policy.step()
                v = self.values_of(ids[idx], attn[idx], p_len)
                vl, vst = m.value_loss(v, old_values[idx], returns[idx], mb_mask, ppo.value_clip)
                self.value.backward(vl)
                self.value.step()
                with torch.no_grad():
                    ent = m.masked_mean(m.entropy_from_logits(logits * self.job.cfg.rollout.temperature), mb_mask)
                for k, x in (
                    ("policy_loss", pl),
                    ("value_loss", vl),
                    ("entropy", ent),
                    ("clipfrac", st["clipfrac"]),
                    ("approx_kl", st["approx_kl"]),
                    ("vf_clipfrac", vst["vf_clipfrac"]),
                ):
                    sums[k] = sums.get(k, 0.0) + float(x.detach())
                n += 1
        return {k: v / n for k, v in sums.items()}

    def sync_rollout(self, check: list[list[int]] | None) -> dict[str, float]:
        """The updated policy into the rollout engine (gathered from ZeRO-3 shards one
        parameter at a time). With ``check`` prompts: the engine's greedy answers after the
        sync against the training model's own (``sync_greedy_match``, 1.0 = every answer
        token for token) and against the engine's answers before it (``sync_greedy_changed``)
        — a sync that silently fails leaves vLLM sampling from the old policy."""
        from cai_ray.train.ppo.rollout import gathered_params

        n = self.job.cfg.rollout.max_new_tokens
        before = self.rollout.greedy(check, n) if check else None
        self.rollout.sync(gathered_params(self.policy.module, self.job.cfg.zero))
        if not check:
            return {}
        after, own = self.rollout.greedy(check, n), self.greedy_ids(check, n)
        return {
            "sync_greedy_match": sum(a == o for a, o in zip(after, own)) / len(check),
            "sync_greedy_changed": sum(a != b for a, b in zip(after, before)) / len(check),
        }

    def pool_sync_check(self, check: list[list[int]]) -> dict[str, float]:
        """After a push: this rank's engine's greedy answers against the training policy's own
        (``sync_greedy_match``, 1.0 = every answer token for token)."""
        import ray

        from cai_ray.train.ppo.pool import _get

        n = self.job.cfg.rollout.max_new_tokens
        ref = self.source.engine.greedy.remote(check, n)
        own = self.greedy_ids(check, n)
        after = _get(ray, [ref], self.job.cfg.rollout.sync_timeout_s, "the rollout engine's greedy check")[0]
        return {"sync_greedy_match": sum(a == o for a, o in zip(after, own)) / len(check)}

    def greedy_ids(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The training policy's greedy response ids (up to and including EOS)."""
        return self._generate(self.policy.module, prompts, max_new_tokens)

    def probe_refusal_rate(self) -> float | None:
        """Share of the benign probes (greedy answers, split over the workers) that are refusals."""
        from cai_ray.core.refusal import is_refusal

        mine = self.probes[self.rank :: self.world]
        flags: list[bool] = []
        if self.synced_generation and not mine:
            # a rank without probes still runs the ZeRO-3 forwards the others' generation needs
            mine = self.probes[:1]
            keep = 0
        else:
            keep = len(mine)
        if mine:
            enc = [_encode(self.tok, [{"role": "user", "content": p}]) for p in mine]
            gen = self._generate(self.policy.module, enc, self.job.cfg.monitor.probe_max_new_tokens)
            flags = [is_refusal(t) for t in self.tok.batch_decode(gen, skip_special_tokens=True)][:keep]
        every = self._gather(flags)
        return sum(every) / len(every) if every else None

    # -- across workers -------------------------------------------------------------------------
    def _all_sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=collective_device(self.device))
        dist.all_reduce(t)
        return t.cpu().tolist()

    def _mean_all(self, x: float) -> float:
        return self._all_sum([x])[0] / self.world

    def _sum_all(self, x: float) -> float:
        return self._all_sum([x])[0]

    def _max_all(self, x: float) -> float:
        return max(self._gather([x]))

    def _std_all(self, scores) -> float:
        n, s, s2 = self._all_sum([scores.numel(), scores.sum().item(), (scores**2).sum().item()])
        return math.sqrt(max(s2 / n - (s / n) ** 2, 0.0))

    def _whiten_all(self, adv, mask):
        """(A - mean) / std with the statistics of every worker's tokens."""
        n, s, s2 = self._all_sum([mask.sum().item(), (adv * mask).sum().item(), (adv**2 * mask).sum().item()])
        mean = s / n
        var = max(s2 / n - mean**2, 0.0) * n / max(n - 1, 1)
        return (adv - mean) / math.sqrt(var + 1e-8) * mask

    def _gather(self, items: list) -> list:
        import torch.distributed as dist

        if self.world == 1:
            return list(items)
        out: list = [None] * self.world
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, d: Path) -> None:
        self.policy.save_checkpoint(str(d), tag="policy", save_latest=False)
        self.value.save_checkpoint(str(d), tag="value", save_latest=False)
        if self.rank == 0:
            state = {
                "step": self.step,
                "policy_version": self.version,
                # batch_rows(step) is a function of the step: the position says where the next one starts
                "data_position": {"rows_per_worker": len(self.rows), "next_row": self.step * self.per_worker},
                "kl": self.kl.state_dict(),
                "history": self.history,
            }
            (d / "loop_state.json").write_text(json.dumps(state))

    def restore(self, d: Path) -> None:
        self.policy.load_checkpoint(str(d), tag="policy")
        self.value.load_checkpoint(str(d), tag="value")
        state = json.loads((d / "loop_state.json").read_text())
        self.step, self.history = state["step"], state["history"]
        self.version = state.get("policy_version", self.step)
        position = state.get("data_position")
        if position and position["rows_per_worker"] != len(self.rows):
            log.warning(
                "the checkpoint's data had %d prompts per worker, this run's has %d: the prompt order differs from here on",
                position["rows_per_worker"],
                len(self.rows),
            )
        self.kl.load_state_dict(state["kl"])
        if self.pooled:
            self.source.drop_inflight()  # batches sampled before the restart are not this state's
            self.push_weights()
        elif not self.rollout.shares_weights:
            from cai_ray.train.ppo.rollout import gathered_params

            self.rollout.sync(gathered_params(self.policy.module, self.job.cfg.zero))

    def save_models(self, out: Path) -> None:
        """OUTPUT/model (the policy) and OUTPUT/value as plain HF folders; ZeRO-3 gathers first.
        With LoRA, OUTPUT/model is the base with the adapters merged in (``lora.merge``, the
        default), or the adapter alone."""
        for engine, name in ((self.policy, "model"), (self.value, "value")):
            if self.job.cfg.zero == 3:
                state = engine._zero3_consolidated_16bit_state_dict()
            else:
                state = engine.module.state_dict()
            if self.rank != 0:
                continue
            if name == "model" and self.lora is not None:
                self._save_lora(state, out / name)
            else:
                engine.module.save_pretrained(str(out / name), state_dict=state)
            self.tok.save_pretrained(str(out / name))

    def _save_lora(self, state: dict, folder: Path) -> None:
        """The trained adapters from ``state`` (the policy's whole state, gathered) on a fresh
        copy of the base, merged or not: the training engine itself stays as it is."""
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from cai_ray.models import resolve_model

        base = AutoModelForCausalLM.from_pretrained(resolve_model(self.job.cfg.model), dtype=self.dtype)
        fresh = get_peft_model(base, self.lora)
        missing, unexpected = fresh.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise RuntimeError(
                f"the policy's adapters do not fit a fresh copy: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if self.job.cfg.lora.merge:
            fresh.merge_and_unload().save_pretrained(str(folder))
        else:
            fresh.save_pretrained(str(folder))


def ppo_loop(config: dict[str, harness.WorkerJob]) -> None:
    """Ray Train worker function: build the four models, restore the last checkpoint (a
    restarted worker or a re-run), then run the steps."""
    import ray.train
    from ray.train import Checkpoint

    job = config["job"]
    w = Worker(job)
    out = job.folder()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            w.restore(Path(d))
        log.info("resumed at step %d", w.step)
    resumed_at = w.step
    steps, every = job.cfg.ppo.steps, job.cfg.checkpoint.every_steps
    t0 = time.perf_counter()
    for step in range(w.step, steps):
        metrics = w.run_step(step)
        w.step = step + 1
        w.history.append(metrics)
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        if w.rank == 0:
            _write_progress(out, w.history, job)
            log.info(
                "step %d/%d reward %.4f kl %.4f entropy %.3f clipfrac %.3f",
                w.step,
                steps,
                metrics["reward"],
                metrics["kl"],
                metrics["entropy"],
                metrics["clipfrac"],
            )
        if w.step % every == 0 or w.step == steps:
            with tempfile.TemporaryDirectory() as d:
                ph = time.perf_counter()
                w.save(Path(d))
                metrics["seconds"]["checkpoint"] = round(time.perf_counter() - ph, 4)
                ray.train.report(report, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(report)
    seconds = time.perf_counter() - t0
    w.close()
    w.save_models(out)
    if w.rank == 0:
        _write_progress(out, w.history, job)
        last = w.history[-1] if w.history else {}
        summary = {
            "global_step": w.step,
            "train_loss": last.get("policy_loss"),
            "resumed_from": resumed_at or None,
            "train_seconds": round(seconds, 3),
            "first": _headline(w.history[0]) if w.history else None,
            "last": _headline(last) if last else None,
            "seconds_per_step": _mean_seconds(w.history[resumed_at:]),
            "loss_curve": [{"step": h["step"], "loss": h["policy_loss"]} for h in w.history],
            "history": w.history,
            "plot": str(out / "ppo.png"),
            "samples": str(out / "samples.jsonl"),
        }
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
        harness.publish(job, out)


HEADLINE = (
    "reward",
    "kl",
    "kl_coef",
    "entropy",
    "clipfrac",
    "value_loss",
    "response_length",
    "top_ngram_share",
    "probe_refusal_rate",
)


def _headline(m: dict) -> dict:
    return {k: m.get(k) for k in HEADLINE}


def _mean_seconds(history: list[dict]) -> dict[str, float] | None:
    if not history:
        return None
    total: dict[str, float] = {}
    for h in history:
        for k, v in h["seconds"].items():
            total[k] = total.get(k, 0.0) + v
    return {k: round(v / len(history), 4) for k, v in total.items()}


def _write_progress(out: Path, history: list[dict], job: harness.WorkerJob) -> None:
    """metrics so far (steps.jsonl), the plot and the samples: a user watches a run here."""
    with open(out / "steps.jsonl", "w") as f:
        f.writelines(json.dumps({k: v for k, v in h.items() if k != "samples"}) + "\n" for h in history)
    with open(out / "samples.jsonl", "w") as f:
        for h in history:
            f.writelines(json.dumps({"step": h["step"], **s}) + "\n" for s in h["samples"])
    plot_ppo(history, out / "ppo.png")


def plot_ppo(history: list[dict], path: Path) -> None:
    """Reward, KL, entropy, clip fraction, value loss, length, Goodhart monitors and phase times per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", "mean reward"),
        ("kl", "KL to reference (per response)"),
        ("entropy", "entropy (per token)"),
        ("clipfrac", "clip fraction"),
        ("value_loss", "value loss"),
        ("response_length", "response tokens"),
        ("top_ngram_share", "top n-gram share (boilerplate)"),
        ("probe_refusal_rate", "benign refusal rate"),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(12, 9))
    steps = [h["step"] for h in history]
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(s, h.get(key)) for s, h in zip(steps, history) if h.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", markersize=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
    ax = axes.flat[-1]
    bottom = [0.0] * len(history)
    for phase in PHASES:
        vals = [h["seconds"].get(phase, 0.0) for h in history]
        if any(vals):
            ax.bar(steps, vals, bottom=bottom, label=phase, width=1.0)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_title("seconds per phase", fontsize=10)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
