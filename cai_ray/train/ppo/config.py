"""`cai-ray train ppo`'s config: PPO and its critic-free variants (GRPO, RLOO)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cai_ray.config import ConfigError, positive, setting
from cai_ray.config.sections import EngineConfig, LabelerConfig
from cai_ray.train.config import TrainConfig

RL_ALGOS = ("ppo", "grpo", "rloo")


REWARD_SOURCES = ("auto", "model", "function", "labeler")


@dataclass(frozen=True)
class RewardSection:
    # `label` named the method beside `labeler`, its model; renamed for one release
    DEPRECATED = {"label": ("method",)}

    source: str = setting(
        "auto",
        "model (a preference model folder) | function (a Python reward function) | labeler "
        "(d-RLAIF: the AI labeler compares each answer with a reference answer) | auto: the one set",
    )
    model: str | None = setting(
        None, "preference model folder (`cai-ray train rm` OUTPUT/model); also the value model's initialisation"
    )
    function: str | None = setting(
        None,
        "FILE.py:NAME or MODULE:NAME, called as NAME(prompts, responses) -> list of floats "
        "(prompts: the chat messages of each row; responses: strings)",
    )
    labeler: EngineConfig = field(
        default_factory=lambda: EngineConfig(model=""),
        metadata={
            "help": "d-RLAIF: the labeler engine (hf, vllm, or openai at a "
            "`cai-ray serve` /v1 URL, which labels with its /v1/label)"
        },
    )
    method: LabelerConfig = field(default_factory=LabelerConfig, metadata={"help": "d-RLAIF: the labeling method"})
    constitution: str = setting("constitutions/general.yaml", "d-RLAIF: constitution of the labeler's comparisons")
    reference: str = setting(
        "policy",
        "d-RLAIF reference answer: policy (the frozen reference policy's greedy "
        "answer, once per prompt) | field (the prompt row's `reference`)",
    )
    length_penalty: float = setting(0.0, "subtracted from the score per response token")
    clip: float | None = setting(None, "clip scores to [-clip, clip] (null = no clipping)")

    def validate(self, where: str) -> None:
        if self.source not in REWARD_SOURCES:
            raise ConfigError(f"{where}.source: must be one of {', '.join(REWARD_SOURCES)}, got {self.source!r}")
        given = [
            s for s, v in (("model", self.model), ("function", self.function), ("labeler", self.labeler.model)) if v
        ]
        if self.source == "auto":
            if len(given) != 1:
                raise ConfigError(
                    f"{where}: set exactly one reward: --reward-model DIR, reward.function=FILE.py:NAME "
                    f"or reward.labeler.model=MODEL (got {', '.join(given) or 'none'})"
                )
        elif self.source not in given:
            key = "labeler.model" if self.source == "labeler" else self.source
            raise ConfigError(f"{where}.source is {self.source}, but {where}.{key} is not set")
        if self.function is not None and not re.match(r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$", self.function):
            raise ConfigError(f"{where}.function: expected FILE.py:NAME or MODULE:NAME, got {self.function!r}")
        if self.kind == "labeler":
            self.labeler.validate(f"{where}.labeler")
            self.method.validate(f"{where}.method")
        if self.reference not in ("policy", "field"):
            raise ConfigError(f"{where}.reference: must be policy or field, got {self.reference!r}")
        if self.length_penalty < 0:
            raise ConfigError(f"{where}.length_penalty: must be >= 0")
        if self.clip is not None:
            positive(where, "clip", self.clip)

    @property
    def kind(self) -> str:
        """model | function | labeler: the source in use."""
        if self.source != "auto":
            return self.source
        return "model" if self.model else "function" if self.function else "labeler"


@dataclass(frozen=True)
class RolloutSection:
    engine: str = setting(
        "hf",
        "hf: transformers generate (colocated: with the training weights themselves, no copy, no "
        "sync) | vllm: vLLM (GPU, or vLLM's CPU build), weights pushed into it after every update",
    )
    placement: str = setting(
        "colocated",
        "colocated: each trainer rank samples in its own process, then trains (never overlapping) | "
        "pool: rollout.pool_engines engine actors on resources of their own (needed by ppo.mode=async)",
    )
    pool_engines: int = setting(1, "pool: engine actors (trainer rank r sends its prompts to engine r mod N)")
    cpus_per_engine: float = setting(
        1.0, "pool: CPUs per engine actor (its threads); on GPUs each engine also takes a GPU"
    )
    sync_bucket_mb: float = setting(
        64.0, "pool: weights travel to the engines in buckets of this size (MiB), at most two in flight"
    )
    transfer: str = setting(
        "auto",
        "pool: how weights reach the engines: objstore (buckets through Ray's object store) | nccl "
        "(GPU to GPU through vLLM's NCCL weight-transfer backend; vllm engines, full weights) | "
        "auto: nccl on GPUs with vllm and no LoRA, else objstore",
    )
    sync_timeout_s: float = setting(
        300.0, "pool: deadline for every call to an engine (a bucket, a batch): past it the step fails with the reason"
    )
    start_timeout_s: float = setting(600.0, "pool: deadline for the engines to load their models")
    max_new_tokens: int = setting(128, "tokens per sampled response")
    temperature: float = setting(1.0, "sampling temperature (log-probabilities are taken at the same temperature)")
    top_p: float = setting(1.0, "nucleus sampling mass (1 = the exact policy distribution)")
    gpu_memory_utilization: float = setting(0.3, "vllm: share of GPU memory for its weights and KV cache")
    enforce_eager: bool = setting(True, "vllm: eager mode; false = torch.compile / CUDA graphs")
    check_sync: bool = setting(
        False,
        "vllm: after every weight sync, compare vLLM's greedy answers to the policy's own "
        "(metrics sync_greedy_match / sync_greedy_changed; costs two greedy passes)",
    )

    def validate(self, where: str) -> None:
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"{where}.engine: must be hf or vllm, got {self.engine!r}")
        if self.placement not in ("colocated", "pool"):
            raise ConfigError(f"{where}.placement: must be colocated or pool, got {self.placement!r}")
        from cai_ray.train.ppo.transfer import TRANSFERS

        if self.transfer not in TRANSFERS:
            raise ConfigError(f"{where}.transfer: must be one of {', '.join(TRANSFERS)}, got {self.transfer!r}")
        if self.transfer == "nccl" and self.engine != "vllm":
            raise ConfigError(f"{where}.transfer=nccl: vLLM engines only (rollout.engine=vllm)")
        for key in ("pool_engines", "cpus_per_engine", "sync_bucket_mb", "sync_timeout_s", "start_timeout_s"):
            positive(where, key, getattr(self, key))
        positive(where, "max_new_tokens", self.max_new_tokens)
        if self.temperature < GREEDY_TEMPERATURE:
            raise ConfigError(f"{where}.temperature: must be >= {GREEDY_TEMPERATURE} (RL samples; it cannot be greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p: must be in (0, 1]")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization: must be in (0, 1]")


GREEDY_TEMPERATURE = 0.05


@dataclass(frozen=True)
class PPOSection:
    steps: int = setting(100, "RL steps (each: rollout, score, advantages, ppo_epochs of updates)")
    rollout_batch: int = setting(16, "prompts per step, over all workers (a multiple of the worker count)")
    group_size: int = setting(4, "grpo/rloo: answers per prompt (their baseline); ppo samples one")
    ppo_epochs: int = setting(2, "passes over each rollout batch")
    clip_range: float = setting(0.2, "PPO ratio clip epsilon")
    value_clip: float = setting(0.2, "value clip around the rollout's values")
    gamma: float = setting(1.0, "discount")
    lam: float = setting(0.95, "GAE lambda")
    kl_coef: float = setting(
        0.05, "beta of the per-token KL penalty to the reference (SFT) policy; the initial value with adaptive_kl"
    )
    adaptive_kl: float | None = setting(
        None, "target KL per response: adapt beta towards it (Ziegler et al.); null = fixed beta"
    )
    kl_horizon: int = setting(10000, "adaptive KL horizon in samples")
    kl_estimator: str = setting("k1", "per-token KL estimator: k1 (log ratio) | k2 | k3")
    whiten_advantages: bool = setting(True, "normalise advantages over the batch (all workers)")
    value_learning_rate: float = setting(1e-5, "learning rate of the value model (optim.learning_rate is the policy's)")
    mode: str = setting(
        "sync",
        "sync: each step samples with the current policy, then trains | async (needs "
        "rollout.placement=pool): the engines sample the next batches while the trainers update, "
        "at most max_staleness policy versions behind; the loss corrects for the lag",
    )
    max_staleness: int = setting(
        1, "async: a batch sampled by a policy more than this many updates old is never trained on (sampled again)"
    )
    is_cap: float = setting(
        2.0,
        "pool rollouts: the per-token importance weight π_old/π_behaviour (the engine's sampling "
        "policy) is truncated at this value (truncated importance sampling)",
    )
    critic_warmup_steps: int = setting(
        0,
        "first steps train the value model only (a value model fresh from the preference "
        "model has not seen per-token returns)",
    )

    def validate(self, where: str) -> None:
        for key in ("steps", "rollout_batch", "group_size", "ppo_epochs", "kl_horizon", "value_learning_rate"):
            positive(where, key, getattr(self, key))
        if self.group_size < 2:
            raise ConfigError(f"{where}.group_size: grpo/rloo need >= 2 answers per prompt for a baseline")
        for key in ("clip_range", "value_clip"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: must be in (0, 1)")
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"{where}: need 0 < gamma <= 1 and 0 <= lam <= 1")
        if self.kl_coef < 0:
            raise ConfigError(f"{where}.kl_coef: must be >= 0")
        if self.adaptive_kl is not None:
            positive(where, "adaptive_kl", self.adaptive_kl)
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"{where}.kl_estimator: must be k1, k2 or k3")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"{where}.mode: must be sync or async, got {self.mode!r}")
        if self.max_staleness < 1:
            raise ConfigError(f"{where}.max_staleness: must be >= 1 (ppo.mode=sync trains on-policy)")
        if self.is_cap < 1:
            raise ConfigError(f"{where}.is_cap: must be >= 1")
        if self.critic_warmup_steps < 0 or self.critic_warmup_steps >= self.steps:
            raise ConfigError(f"{where}.critic_warmup_steps: must be in [0, steps)")


@dataclass(frozen=True)
class MonitorSection:
    every: int = setting(10, "run the benign probe set every N steps (and at the last step)")
    probe: str | None = setting(
        None, "benign prompts (JSONL with prompt) for the refusal-rate monitor; null = the built-in set of 12"
    )
    probe_max_new_tokens: int = setting(48, "tokens per probe answer (greedy)")
    ngram: int = setting(3, "n of the boilerplate monitor (word n-grams)")
    top_ngrams: int = setting(10, "the boilerplate monitor's share is that of the N most common n-grams")

    def validate(self, where: str) -> None:
        for key in ("every", "probe_max_new_tokens", "ngram", "top_ngrams"):
            positive(where, key, getattr(self, key))


@dataclass(frozen=True)
class RLTrainConfig(TrainConfig):
    """`cai-ray train ppo`: RL-CAI, the policy optimised against the preference model (or another reward)
    with a KL penalty to the SFT policy: PPO (value model + GAE) or GRPO/RLOO (critic-free: ours on
    the pool, TRL's colocated)."""

    data: str = setting(
        "",
        "prompts: JSONL/Parquet with prompt (string) or messages (ending with a user turn) "
        "[, reference for d-RLAIF], or a folder of them",
    )
    model: str = setting("smollm2", "the policy to optimise (the SFT output); also the frozen reference")
    algo: str = setting(
        "ppo",
        "ppo (clipped policy + value model, GAE) | grpo | rloo (critic-free: ppo.group_size answers per "
        "prompt are the baseline; with rollout.placement=pool our loop, sync or async; colocated, TRL's trainers)",
    )
    reward: RewardSection = field(default_factory=RewardSection, metadata={"help": "where the reward comes from"})
    rollout: RolloutSection = field(default_factory=RolloutSection, metadata={"help": "sampling the responses"})
    ppo: PPOSection = field(default_factory=PPOSection, metadata={"help": "the RL algorithm"})
    monitor: MonitorSection = field(default_factory=MonitorSection, metadata={"help": "Goodhart monitors"})

    def validate(self) -> None:
        super().validate()
        if self.algo not in RL_ALGOS:
            raise ConfigError(f"algo: must be one of {', '.join(RL_ALGOS)}, got {self.algo!r}")
        for name in ("reward", "rollout", "ppo", "monitor"):
            getattr(self, name).validate(name)
        if self.ppo.rollout_batch % self.scaling.workers:
            raise ConfigError(
                f"ppo.rollout_batch ({self.ppo.rollout_batch}) must be a multiple of scaling.workers "
                f"({self.scaling.workers}): every worker samples the same number of prompts"
            )
        if self.rollout.max_new_tokens >= self.optim.max_length:
            raise ConfigError(
                f"rollout.max_new_tokens ({self.rollout.max_new_tokens}) must be below optim.max_length "
                f"({self.optim.max_length}), which bounds prompt + response"
            )
        trl = self.algo != "ppo" and self.rollout.placement == "colocated"  # TRL's GRPO/RLOO trainers
        if trl and self.reward.kind == "labeler" and self.reward.reference == "policy":
            raise ConfigError(
                "reward.reference: grpo/rloo through TRL (rollout.placement=colocated) score the labeler "
                "against the rows' reference answers; set reward.reference=field, or rollout.placement=pool"
            )
        if self.ppo.mode == "async" and self.rollout.placement != "pool":
            raise ConfigError(
                "ppo.mode=async needs rollout.placement=pool: the engines must run beside the "
                "trainers, on resources of their own, for sampling and training to overlap"
            )
        if trl and self.rollout.engine != "hf":
            raise ConfigError(
                "rollout.engine: colocated grpo/rloo generate through TRL, where only hf is wired; "
                "rollout.placement=pool samples them on vllm engine actors"
            )
        if self.algo != "ppo" and self.ppo.critic_warmup_steps:
            raise ConfigError(f"ppo.critic_warmup_steps: {self.algo} has no value model to warm up")
        if self.rollout.transfer == "nccl" and self.lora.enabled:
            raise ConfigError(
                "rollout.transfer=nccl: full weights only; LoRA adapters (small) travel through the "
                "object store (rollout.transfer=objstore or auto)"
            )
        if (
            self.lora.enabled
            and self.algo == "ppo"
            and self.rollout.engine == "vllm"
            and self.rollout.placement != "pool"
        ):
            raise ConfigError(
                "lora with rollout.engine=vllm needs rollout.placement=pool (the adapter reaches the "
                "pool's vLLM engines as a LoRARequest; the colocated engine takes full weights only)"
            )
