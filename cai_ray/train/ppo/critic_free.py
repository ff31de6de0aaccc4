"""GRPO and RLOO (critic-free RL) through TRL's trainers, under the same Ray Train + DeepSpeed harness:
the colocated placement. With ``rollout.placement=pool`` (sync or async) they run PPO's own loop
instead (``loop.py``: group advantages, no value model).

    prompts ─► harness: TorchTrainer(N workers) ─► GRPOTrainer | RLOOTrainer(policy, reward_funcs=[ours])
                                                      └► OUTPUT/model, metrics.json (TRL's log: reward, kl, ...)

``ppo.group_size`` answers per prompt form each baseline (group mean and std for GRPO, the
leave-one-out mean for RLOO). The reward is the same ``RewardScorer`` PPO uses (preference
model, reward function or the AI labeler), so switching algorithm does not change what is
rewarded. TRL computes the KL to the reference (the initial policy) itself (``ppo.kl_coef``).
"""

from __future__ import annotations

from pathlib import Path

from cai_ray.train import harness

load_base = harness.load_causal_lm


class RewardFunction:
    """TRL reward function: conversational prompts and completions in, our scores out. The
    scorer (and its model) is built on first use, in the worker."""

    def __init__(self, job: harness.WorkerJob):
        self.job = job
        self.scorer = None
        self.kind = job.cfg.reward.kind
        self.__name__ = f"reward_{self.kind}"  # TRL logs rewards/<name>/mean

    def __call__(self, prompts, completions, completion_ids=None, id=None, reference=None, **_):
        from cai_ray.train.ppo.reward import RewardScorer

        if self.scorer is None:
            cuda, _ = harness.precision(self.job)
            self.scorer = RewardScorer(
                self.job.cfg.reward, self.job.base_dir, device="cuda" if cuda else "cpu", seed=self.job.cfg.seed
            )
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        msgs = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        lengths = [len(x) for x in completion_ids] if completion_ids is not None else [0] * len(texts)
        ids = id or [str(i) for i in range(len(texts))]
        return self.scorer.score(ids, msgs, texts, lengths, reference)


def build(job: harness.WorkerJob, work: Path, callbacks: list | None = None):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tok, model = load_base(job)
    ppo, ro = job.cfg.ppo, job.cfg.rollout
    args_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if job.kind == "grpo" else (RLOOConfig, RLOOTrainer)
    args = harness.training_args(
        args_cls,
        job,
        work,
        max_steps=ppo.steps,
        num_generations=ppo.group_size,
        max_completion_length=ro.max_new_tokens,
        temperature=ro.temperature,
        top_p=ro.top_p,
        beta=ppo.kl_coef,
        epsilon=ppo.clip_range,
        num_iterations=ppo.ppo_epochs,
        generation_batch_size=ppo.rollout_batch * ppo.group_size,
    )
    rows = [{"prompt": r["prompt"], "id": r["id"], "reference": r["reference"] or ""} for r in job.rows]
    return trainer_cls(
        model=model,
        reward_funcs=[RewardFunction(job)],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=callbacks or [],
        peft_config=harness.lora_config(job, "CAUSAL_LM"),
    )
