"""PPO's update component: the policy and the value model under DeepSpeed, the frozen reference;
log-probs, values, the clipped updates, greedy answers, checkpoints and the final folders.

Four models per worker (OpenRLHF's layout): policy and value train under DeepSpeed (ZeRO-2 or
-3, own optimizers); the reference (here) and the reward model (``reward.RewardScorer``) are
frozen, partitioned too under ZeRO-3. The value model starts from the preference model (its
score head predicts returns), or, with a reward function or the labeler, from the policy with
a zero head. With ``lora`` the policy trains adapters only (peft). GRPO and RLOO (``algo``) have
no value model: their baseline is the other answers to the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.train import harness


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


def positions(attn):
    """Position ids of a left-padded batch."""
    return (attn.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, ids, attn, p_len: int, temperature: float, with_logits: bool = False):
    """Log-probabilities of the response tokens (at the sampling temperature) and, when asked,
    the response logits (for entropy)."""
    import torch

    # logits for the response positions only (and the last prompt token, which predicts the
    # first response token): [batch, response, vocab] instead of [batch, prompt + response,
    # vocab] — with a 150k vocabulary the prompt's logits alone can outweigh the model
    keep = ids.shape[1] - p_len + 1
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn), logits_to_keep=keep).logits
    logits = out[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p_len:, None]).squeeze(-1)
    return (logp, logits) if with_logits else logp


@dataclass
class UpdateBatch:
    """One rank's rollout batch as the update takes it (tensors over [batch, response] unless
    said): the padded ids and attention (prompt + response), the prompt width, the response
    mask, π_old's log-probs, the value model's values (None without one), advantages, returns
    (None without a value model), the importance weights of responses another policy sampled
    and (GRPO) the reference's log-probs."""

    ids: Any
    attn: Any
    p_len: int
    mask: Any
    old_logp: Any
    old_values: Any
    adv: Any
    returns: Any
    is_weights: Any = None
    ref_logp: Any = None


def value_head(model):
    return model.score if hasattr(model, "score") else model.classifier


class Learner:
    def __init__(self, job: harness.WorkerJob, tok, device, dtype, world: int, rank: int, path: str):
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from cai_ray.models import resolve_model
        from cai_ray.train.ppo.rollout import synced_generation

        self.job, self.tok, self.device, self.dtype = job, tok, device, dtype
        self.world, self.rank, self.path = world, rank, path
        rw = job.cfg.reward
        mb, lr = job.cfg.optim.per_worker_batch_size, job.cfg.optim.learning_rate

        self.critic = job.cfg.algo == "ppo"  # grpo/rloo: no value model
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        policy.generation_config.pad_token_id = tok.pad_token_id
        self.lora = harness.lora_config(job, "CAUSAL_LM")
        if self.lora is not None:
            from peft import get_peft_model

            # adapters only: the base weights are frozen, the optimizer holds the adapters' state,
            # and only the adapters travel to the rollout engines
            policy = get_peft_model(policy, self.lora)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)

        self.policy, *_ = deepspeed.initialize(
            model=policy,
            optimizer=torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0),
            config=ds_config(job, mb, world),
        )
        self.value = None
        if self.critic:
            value_path = resolve_model(rw.model) if rw.kind == "model" else path
            value = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, dtype=dtype)
            value.config.pad_token_id = tok.pad_token_id
            if rw.kind != "model":
                with torch.no_grad():
                    value_head(value).weight.zero_()  # a fresh head: V = 0 until it learns returns
            self.value, *_ = deepspeed.initialize(
                model=value,
                optimizer=torch.optim.AdamW(value.parameters(), lr=job.cfg.ppo.value_learning_rate, weight_decay=0.0),
                config=ds_config(job, mb, world),
            )
        self.ref = self.frozen(ref) if job.cfg.zero == 3 else ref.to(device)
        self.synced_generation = synced_generation(job.cfg.zero)

    def frozen(self, model):
        """A frozen model partitioned like the trained ones (ZeRO-3: each rank holds a shard;
        every forward gathers it, so every rank must run the same forwards)."""
        import deepspeed

        engine, *_ = deepspeed.initialize(
            model=model, config=ds_config(self.job, self.job.cfg.optim.per_worker_batch_size, self.world, frozen=True)
        )
        engine.eval()  # DeepSpeedEngine.eval() returns None, not the engine
        return engine

    # -- forward passes ----------------------------------------------------------------------
    def logprobs(self, model, ids, attn, p_len: int, with_logits: bool = False):
        return response_logprobs(model, ids, attn, p_len, self.job.cfg.rollout.temperature, with_logits)

    def values_of(self, ids, attn, p_len: int):
        """V(s_t) before each response token: the value head on every position's hidden state."""
        m = self.value.module
        backbone = getattr(m, m.base_model_prefix)
        h = backbone(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).last_hidden_state
        return value_head(m)(h).squeeze(-1)[:, p_len - 1 : -1].float()

    def chunks(self, n: int):
        mb = self.job.cfg.optim.per_worker_batch_size
        return [slice(i, min(i + mb, n)) for i in range(0, n, mb)]

    def reference_logprobs(self, ids, attn, p_len: int):
        """The frozen reference's log-probs of the responses, a minibatch at a time, no gradient."""
        import torch

        with torch.no_grad():
            return torch.cat([self.logprobs(self.ref, ids[s], attn[s], p_len) for s in self.chunks(ids.shape[0])])

    def old_logprobs_and_values(self, ids, attn, p_len: int):
        """π_old's log-probs (the policy as the update starts) and the value model's values
        (None without a value model)."""
        import torch

        n = ids.shape[0]
        with torch.no_grad():
            old = torch.cat([self.logprobs(self.policy, ids[s], attn[s], p_len) for s in self.chunks(n)])
            if not self.critic:
                return old, None
            values = torch.cat([self.values_of(ids[s], attn[s], p_len) for s in self.chunks(n)])
        return old, values

    def generate(self, module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy response ids of ``module`` (ranks kept in step under ZeRO-3)."""
        from cai_ray.train.ppo.rollout import generate_ids

        return generate_ids(
            module, self.tok, prompts, self.device, max_new_tokens=max_new_tokens, synced=self.synced_generation
        )

    def greedy_ids(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The training policy's greedy response ids (up to and including EOS)."""
        return self.generate(self.policy.module, prompts, max_new_tokens)

    def reference_greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The frozen reference policy's greedy response ids, a minibatch at a time."""
        module = self.ref.module if hasattr(self.ref, "module") else self.ref
        out: list[list[int]] = []
        for sl in self.chunks(len(prompts)):
            out += self.generate(module, prompts[sl], max_new_tokens)
        return out

    def weights(self):
        """(name, full tensor) of what the rollout engines need: every parameter, or the
        adapters alone with LoRA (gathered one at a time under ZeRO-3: every rank iterates)."""
        from cai_ray.train.ppo.rollout import gathered_params

        return gathered_params(self.policy.module, self.job.cfg.zero, adapters_only=self.lora is not None)

    # -- the update --------------------------------------------------------------------------
    def update(self, b: UpdateBatch, train_policy: bool, kl_coef: float = 0.0) -> dict:
        """``ppo_epochs`` × minibatches: the clipped policy loss (times the importance weights
        of responses another policy sampled) and, with a value model, the clipped value loss.
        ``b.ref_logp`` (GRPO): the KL to the reference is a loss term, ``kl_coef``·k3, instead
        of a reward penalty."""
        import torch

        from cai_ray.core import rl_math as m

        ppo = self.job.cfg.ppo
        ids, attn, p_len, mask = b.ids, b.attn, b.p_len, b.mask
        old_logp, old_values, adv, returns = b.old_logp, b.old_values, b.adv, b.returns
        is_weights, ref_logp = b.is_weights, b.ref_logp
        sums: dict[str, float] = {}
        n = 0
        gen = torch.Generator().manual_seed(self.job.cfg.seed)
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(ids.shape[0], generator=gen).to(self.device)
            for sl in self.chunks(ids.shape[0]):
                idx = order[sl]
                mb_mask = mask[idx]
                logp, logits = self.logprobs(self.policy, ids[idx], attn[idx], p_len, with_logits=True)
                w = None if is_weights is None else is_weights[idx]
                pl, st = m.policy_loss(logp, old_logp[idx], adv[idx], mb_mask, ppo.clip_range, weights=w)
                parts = [("policy_loss", pl), ("clipfrac", st["clipfrac"]), ("approx_kl", st["approx_kl"])]
                loss = pl
                if ref_logp is not None:
                    kl_loss = m.masked_mean(m.kl_per_token(logp, ref_logp[idx], "k3"), mb_mask)
                    loss = pl + kl_coef * kl_loss
                    parts.append(("kl_loss", kl_loss))
                if train_policy:
                    self.policy.backward(loss)
                    self.policy.step()
                if self.critic:
                    v = self.values_of(ids[idx], attn[idx], p_len)
                    vl, vst = m.value_loss(v, old_values[idx], returns[idx], mb_mask, ppo.value_clip)
                    self.value.backward(vl)
                    self.value.step()
                    parts += [("value_loss", vl), ("vf_clipfrac", vst["vf_clipfrac"])]
                with torch.no_grad():
                    ent = m.masked_mean(m.entropy_from_logits(logits * self.job.cfg.rollout.temperature), mb_mask)
                for k, x in parts + [("entropy", ent)]:
                    sums[k] = sums.get(k, 0.0) + float(x.detach())
                n += 1
        return {k: v / n for k, v in sums.items()}

    # -- checkpoints and outputs -------------------------------------------------------------
    def engines(self) -> list[tuple[Any, str]]:
        """(DeepSpeed engine, name) of the trained models: the policy, and the value model if any."""
        return [(self.policy, "policy")] + ([(self.value, "value")] if self.critic else [])

    def save(self, d: Path) -> None:
        for engine, tag in self.engines():
            engine.save_checkpoint(str(d), tag=tag, save_latest=False)

    def restore(self, d: Path) -> None:
        for engine, tag in self.engines():
            engine.load_checkpoint(str(d), tag=tag)

    def save_models(self, out: Path) -> None:
        """OUTPUT/model (the policy) and OUTPUT/value (PPO) as plain HF folders; ZeRO-3 gathers
        first. With LoRA, OUTPUT/model is the base with the adapters merged in (``lora.merge``,
        the default), or the adapter alone."""
        for engine, tag in self.engines():
            name = "model" if tag == "policy" else tag
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

        base = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype)
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
