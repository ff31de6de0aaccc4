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

GRPO and RLOO (``algo``) run this loop too when they sample from the pool
(``rollout.placement=pool``, sync or async): ``ppo.group_size`` answers per prompt, no value
model, one advantage per answer from its group (``rl_math.group_advantages``); GRPO keeps the
KL to the reference as a loss term (k3), RLOO subtracts it from the score. Colocated, they run
TRL's trainers (``critic_free.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
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
PLOT_EVERY_S = 30.0  # ppo.png is redrawn at most this often (a draw costs ~0.7 s of CPU), and at the end
# Ray Train's report waits until its controller has taken the previous one, which it polls every
# 2 s: a report per step capped short steps at one per 2 s. Steps without a checkpoint report
# at most this often (the metrics themselves are in steps.jsonl every step).
REPORT_EVERY_S = 10.0


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


# -- the job --------------------------------------------------------------------------------
def ours(cfg) -> bool:
    """Whether this loop runs the algorithm: PPO always, GRPO/RLOO when they sample from the pool."""
    return cfg.algo == "ppo" or cfg.rollout.placement == "pool"


def train_rl(cfg) -> dict[str, Any]:
    """Run RL as an ``RLTrainConfig`` says (this loop, or TRL's GRPO/RLOO); returns the manifest."""
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
        cfg.algo,  # this loop, or (grpo/rloo colocated) TRL's trainers in the harness's
        cfg,
        rows,
        rejects,
        loop=ppo_loop if ours(cfg) else None,
        stage="ppo",  # the command, `train ppo`, whatever the algorithm (the manifest's config says which)
        fingerprint_extra=fingerprint,
        manifest_extra={"reward": reward_info, "algo": cfg.algo, "loop": "cai-ray" if ours(cfg) else "trl"},
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


class Worker:
    """One Ray Train worker: its components and the step; ``ppo_loop`` drives it.

    Learner  (learner.py)   policy and value under DeepSpeed, the frozen reference; the update
    Sampler  (sampling.py)  rollouts from the rank's own engine or from the pool; weight syncs
    RewardScorer (reward.py) the score of each response
    Ranks    (ranks.py)     reductions across workers
    """

    def __init__(self, job: harness.WorkerJob):
        import ray.train
        import torch
        from transformers import AutoTokenizer

        from cai_ray.core.rl_math import AdaptiveKL
        from cai_ray.models import resolve_model
        from cai_ray.train.ppo.learner import Learner
        from cai_ray.train.ppo.monitors import load_probes
        from cai_ray.train.ppo.ranks import Ranks
        from cai_ray.train.ppo.reward import RewardScorer
        from cai_ray.train.ppo.sampling import Sampler

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
        self.reward_kind = job.cfg.reward.kind
        rows = job.rows
        self.rows = rows[self.rank :: self.world] or rows  # every worker needs prompts, even with few rows
        self.per_worker = job.cfg.ppo.rollout_batch // self.world
        self.algo = job.cfg.algo
        self.group = 1 if self.algo == "ppo" else job.cfg.ppo.group_size  # answers per prompt

        self.ranks = Ranks(self.rank, self.world, self.device)
        self.learner = Learner(job, self.tok, self.device, self.dtype, self.world, self.rank, path)
        self.sampler = Sampler(job, self.learner, self.ranks, self.tok, path, self.prompts)
        self.scorer = RewardScorer(
            job.cfg.reward,
            job.base_dir,
            device=str(self.device),
            seed=job.cfg.seed,
            reference_answer=self.reference_answers,
            dtype=self.dtype,
            prepare=self.learner.frozen if job.cfg.zero == 3 else None,
            cache_references=not self.learner.synced_generation,
        )
        self.kl = AdaptiveKL(job.cfg.ppo.kl_coef, job.cfg.ppo.adaptive_kl, job.cfg.ppo.kl_horizon)
        self.probes = load_probes(job.cfg.monitor.probe)
        self.version = 0  # policy version: policy updates applied (the rollout engines' weights carry it)
        self.step = 0
        self.history: list[dict] = []

    def reference_answers(self, prompts: list[list[dict]]) -> list[str]:
        """d-RLAIF reference answers: the frozen reference policy's greedy answers."""
        ids = self.learner.reference_greedy(
            [_encode(self.tok, p) for p in prompts], self.job.cfg.rollout.max_new_tokens
        )
        return self.tok.batch_decode(ids, skip_special_tokens=True)

    # -- one step -----------------------------------------------------------------------------
    def batch_rows(self, step: int) -> list[dict]:
        """This worker's prompts for ``step``: its shard, in a seeded order per pass; GRPO/RLOO
        repeat each one ``group_size`` times in a row (a group)."""
        n, k = len(self.rows), self.per_worker
        out = []
        for j in range(step * k, step * k + k):
            epoch, i = divmod(j, n)
            order = list(range(n))
            random.Random(f"{self.job.cfg.seed}:{self.rank}:{epoch}").shuffle(order)
            out += [self.rows[order[i]]] * self.group
        return out

    def prompts(self, step: int) -> list[list[int]]:
        return [_encode(self.tok, r["prompt"]) for r in self.batch_rows(step)]

    def run_step(self, step: int) -> dict[str, Any]:
        import torch

        from cai_ray.core import rl_math as m
        from cai_ray.train.ppo.rollout import left_pad

        job, ppo, ph, learner, ranks = self.job, self.job.cfg.ppo, Phases(), self.learner, self.ranks
        rows = self.batch_rows(step)
        prompts = [_encode(self.tok, r["prompt"]) for r in rows]
        train_policy = step >= ppo.critic_warmup_steps  # else a critic warm-up step: the value model alone

        t_step = time.perf_counter()
        with ph("rollout"):
            got = self.sampler.sample(step, self.version, prompts)
            responses, behaviour = got.responses, got.logprobs
            if behaviour is not None:  # an empty answer gets EOS below: no behaviour log-prob for it
                behaviour = [lp if r else [] for r, lp in zip(responses, behaviour)]
            responses = [r or [self.tok.eos_token_id] for r in responses]  # an empty answer still ends
            p_ids, p_attn, p_len = left_pad(prompts, self.tok.pad_token_id, self.device)
            t_len = max(len(r) for r in responses)
            pad = self.tok.pad_token_id
            r_ids = torch.tensor([r + [pad] * (t_len - len(r)) for r in responses], device=self.device)
            mask = torch.tensor([[1.0] * len(r) + [0.0] * (t_len - len(r)) for r in responses], device=self.device)
            ids = torch.cat([p_ids, r_ids], 1)
            attn = torch.cat([p_attn, mask.long()], 1)
            texts = self.tok.batch_decode(responses, skip_special_tokens=True)
            self.sampler.sleep()

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

        with ph("reference"):
            ref_logp = learner.reference_logprobs(ids, attn, p_len)
        with ph("values"):
            old_logp, old_values = learner.old_logprobs_and_values(ids, attn, p_len)
        group_stats: dict[str, float] = {}
        with torch.no_grad(), ph("advantages"):
            beta = self.kl.value
            kl = m.kl_per_token(old_logp, ref_logp, ppo.kl_estimator) * mask
            if self.group == 1:  # PPO: KL in the per-token reward, GAE on the value model's values
                rewards = m.token_rewards(scores, kl, beta, mask)
                adv, returns = m.gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
                if ppo.whiten_advantages:
                    adv = ranks.whiten(adv, mask)
            else:  # GRPO/RLOO: the group is the baseline; every token of an answer gets its advantage
                seq = scores - beta * kl.sum(1) if self.algo == "rloo" else scores  # GRPO: k3 KL in the loss
                adv = m.group_advantages(seq, self.group, self.algo)[:, None] * mask
                returns = None
                flat = scores.view(-1, self.group)
                group_stats = {
                    "group_reward_std": flat.std(1).mean().item(),
                    "flat_groups": (flat.std(1) == 0).float().mean().item(),  # no signal in these
                }
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
            from cai_ray.train.ppo.learner import UpdateBatch

            batch = UpdateBatch(ids, attn, p_len, mask, old_logp, old_values, adv, returns, is_weights)
            batch.ref_logp = ref_logp if self.algo == "grpo" else None
            stats = learner.update(batch, train_policy=train_policy, kl_coef=beta)
        trained_at = self.version  # the trainer's policy version this batch was trained against
        if train_policy:  # a critic warm-up step leaves the policy, its version and the engines' copy as they are
            self.version += 1
        synced: dict[str, float] = {}
        if self.sampler.syncs and train_policy:
            with ph("sync"):
                synced = self.sampler.after_update(
                    self.version, prompts[:SYNC_CHECK_PROMPTS] if job.cfg.rollout.check_sync else None
                )
        seq_kl = (kl.sum(1)).mean().item()
        self.kl.update(ranks.mean(seq_kl), ppo.rollout_batch)

        pooled = self.sampler.pooled
        local = {
            "reward": scores.mean().item(),
            "kl": seq_kl,
            **stats,  # policy_loss, clipfrac, approx_kl, entropy; value_loss, vf_clipfrac (PPO); kl_loss (GRPO)
            "response_length": mask.sum(1).mean().item(),
            "ended_share": sum(1 for r in responses if r[-1] == self.tok.eos_token_id) / len(responses),
            **group_stats,
            **{k: v for k, v in synced.items() if k.startswith("sync_greedy")},
            **is_stats,
        }
        if old_values is not None:
            local.update(
                value_mean=m.masked_mean(old_values, mask).item(), return_mean=m.masked_mean(returns, mask).item()
            )
        if pooled:
            local.update(
                staleness=float(trained_at - got.version),
                rollout_engine_seconds=got.seconds,
                rollout_wait_seconds=got.waited,
                regenerated_stale=float(got.regenerated),
            )
        metrics = {k: ranks.mean(v) for k, v in local.items()}
        metrics.update(step=step + 1, kl_coef=beta, reward_std=ranks.std(scores), policy_version=self.version)
        if pooled:
            metrics["staleness_max"] = ranks.max(local["staleness"])
            for k in ("sync_bytes", "sync_buckets", "sync_seconds", "sync_engine_seconds"):
                metrics[k] = ranks.sum(synced.get(k, 0.0))  # rank 0 sends
        if self.reward_kind == "labeler":
            metrics["labeler_invalid"] = ranks.sum(self.scorer.invalid)
        all_texts = ranks.gather(texts)
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

    def probe_refusal_rate(self) -> float | None:
        """Share of the benign probes (greedy answers, split over the workers) that are refusals."""
        from cai_ray.core.refusal import is_refusal

        mine = self.probes[self.rank :: self.world]
        flags: list[bool] = []
        if self.learner.synced_generation and not mine:
            # a rank without probes still runs the ZeRO-3 forwards the others' generation needs
            mine = self.probes[:1]
            keep = 0
        else:
            keep = len(mine)
        if mine:
            enc = [_encode(self.tok, [{"role": "user", "content": p}]) for p in mine]
            gen = self.learner.greedy_ids(enc, self.job.cfg.monitor.probe_max_new_tokens)
            flags = [is_refusal(t) for t in self.tok.batch_decode(gen, skip_special_tokens=True)][:keep]
        every = self.ranks.gather(flags)
        return sum(every) / len(every) if every else None

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, d: Path) -> None:
        self.learner.save(d)
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
        self.learner.restore(d)
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
        self.sampler.restore(self.version)

    def save_models(self, out: Path) -> None:
        self.learner.save_models(out)

    def close(self) -> None:
        self.sampler.close()


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
    plotted = reported = t0
    for step in range(w.step, steps):
        metrics = w.run_step(step)
        w.step = step + 1
        w.history.append(metrics)
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        if w.rank == 0:
            plot = time.perf_counter() - plotted >= PLOT_EVERY_S
            _write_progress(out, w.history, job, plot=plot)
            plotted = time.perf_counter() if plot else plotted
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
            reported = time.perf_counter()
        elif time.perf_counter() - reported >= REPORT_EVERY_S:
            ray.train.report(report)
            reported = time.perf_counter()
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


def _write_progress(out: Path, history: list[dict], job: harness.WorkerJob, plot: bool = True) -> None:
    """metrics so far (steps.jsonl), the samples and (``plot``) the plot: a user watches a run here."""
    with open(out / "steps.jsonl", "w") as f:
        f.writelines(json.dumps({k: v for k, v in h.items() if k != "samples"}) + "\n" for h in history)
    with open(out / "samples.jsonl", "w") as f:
        for h in history:
            f.writelines(json.dumps({"step": h["step"], **s}) + "\n" for s in h["samples"])
    if plot:
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
