"""`cai-ray classifiers`' config."""

from __future__ import annotations

from dataclasses import dataclass, field

from cai_ray.config import ConfigError, positive, setting
from cai_ray.config.sections import EngineConfig, InputConfig, OutputConfig, PoolConfig, SamplingConfig
from cai_ray.train.config import OptimSection, ScalingSection


@dataclass(frozen=True)
class ClassifiersConfig:
    """`cai-ray classifiers`: synthetic data per principle → AI labels → input and output
    classifiers (Ray Data for the data, Ray Train for training) → AUROC and FPR at a fixed
    recall on held-out synthetic rows and on the eval sets."""

    constitution: str = setting("constitutions/general.yaml", "the constitution whose principles the classifiers guard")
    output: str = setting(
        "",
        "output folder: guard.json (what `cai-ray serve --guard classifier` reads), input/ and output/ (each a "
        "trained classifier: model/, metrics.json, manifest.json), data/ (synthetic rows with principle, role and "
        "the judge's label), filtered.jsonl, metrics.json, manifest.json",
    )
    per_principle: int = setting(8, "synthetic requests per principle and role (violates / respects)")
    skip_categories: str = setting(
        "helpfulness,anti-evasiveness,honesty",
        "principle categories the classifiers leave out: about answer quality, where a violation is often a "
        "refusal (a guard must not learn to flag refusals)",
    )
    roles: str = setting("violate,respect", "which roles to synthesise (both are needed to train)")
    seed_examples: bool = setting(
        True, "add the constitution's own critique and comparison examples as rows (source: constitution)"
    )
    generator: EngineConfig = field(
        default_factory=EngineConfig, metadata={"help": "the model that writes the synthetic requests and answers"}
    )
    prompt_sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=48),
        metadata={"help": "sampling of the synthetic requests (varied: temperature ~1)"},
    )
    answer_sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=96),
        metadata={"help": "sampling of the synthetic answers and of the eval sets' answers"},
    )
    judge: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "the AI judge that labels every row"})
    targets: str = setting(
        "role",
        "training targets: role (1 = written to violate, 0 = to respect; rows the judge confidently contradicts are "
        "filtered) | judge (the judge's soft P(violates))",
    )
    filter_margin: float = setting(
        0.3,
        "targets=role: a row goes to filtered.jsonl when the judge's P(violates) is beyond 0.5 ± this on the other "
        "side of its role; 0.5 = never filter",
    )
    prefixes: int = setting(
        3, "output classifier: answer prefixes per answer in training (streaming checks see partial answers)"
    )
    prefix_chars: int = setting(120, "spacing of those prefixes in characters")
    held_out: float = setting(0.25, "share of synthetic rows (by id, seeded) held out for metrics and the threshold")
    recall: float = setting(0.9, "the fixed recall: the guard's threshold reaches it on held-out rows")
    harmful: str | None = setting(
        "jobs/data/red_team_eval.jsonl", "red-team prompts for the eval-set metrics (null = skip)"
    )
    benign: str | None = setting("jobs/data/benign.jsonl", "benign prompts for the eval-set metrics (null = skip)")
    eval_limit: int | None = setting(None, "first N prompts of each eval set")
    base: str = setting("smollm2", "classifier base model (a classification head is added)")
    zero: int = setting(0, "DeepSpeed ZeRO stage of the classifier training")
    scaling: ScalingSection = field(default_factory=ScalingSection, metadata={"help": "Ray Train workers"})
    optim: OptimSection = field(
        default_factory=lambda: OptimSection(learning_rate=5e-5, per_worker_batch_size=8, max_length=512, epochs=2.0),
        metadata={"help": "classifier optimisation"},
    )
    seed: int = setting(0, "seeds synthesis, the split and training")
    bootstrap: int = setting(500, "bootstrap resamples behind each interval")
    ray_address: str | None = setting(None, "join this Ray cluster; default: start a local one")
    pool: PoolConfig = field(default_factory=PoolConfig, metadata={"help": "the generator's Ray Data actor pool"})
    judge_pool: PoolConfig = field(default_factory=PoolConfig, metadata={"help": "the judge's Ray Data actor pool"})
    inputs: InputConfig = field(default_factory=InputConfig, metadata={"help": "input limits"})
    outputs: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "part sizes"})

    def skip_category_list(self) -> list[str]:
        return [c.strip() for c in self.skip_categories.split(",") if c.strip()]

    def role_list(self) -> list[str]:
        return [r.strip() for r in self.roles.split(",") if r.strip()]

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("output: required (an output folder)")
        if "://" in self.output:
            raise ConfigError("output: a local folder (the guard and the trainers read it from disk)")
        roles = self.role_list()
        if sorted(set(roles)) != ["respect", "violate"] or len(roles) != 2:
            raise ConfigError(f"roles: violate,respect (both: a classifier needs both classes), got {self.roles!r}")
        positive("", "per_principle", self.per_principle)
        if self.targets not in ("role", "judge"):
            raise ConfigError(f"targets: role or judge, got {self.targets!r}")
        if not 0 <= self.filter_margin <= 0.5:
            raise ConfigError(f"filter_margin: must be in [0, 0.5], got {self.filter_margin}")
        if self.prefixes < 1:
            raise ConfigError(f"prefixes: must be >= 1, got {self.prefixes}")
        positive("", "prefix_chars", self.prefix_chars)
        if not 0 < self.held_out < 1:
            raise ConfigError(f"held_out: must be in (0, 1), got {self.held_out}")
        if not 0 < self.recall <= 1:
            raise ConfigError(f"recall: must be in (0, 1], got {self.recall}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero: must be 0, 1, 2 or 3, got {self.zero}")
        if self.bootstrap < 10:
            raise ConfigError(f"bootstrap: at least 10 resamples, got {self.bootstrap}")
        if self.eval_limit is not None:
            positive("", "eval_limit", self.eval_limit)
        self.generator.validate("generator")
        self.judge.validate("judge")
        for name in ("prompt_sampling", "answer_sampling"):
            getattr(self, name).validate(name)
        for name in ("scaling", "optim", "pool", "judge_pool", "inputs", "outputs"):
            getattr(self, name).validate(name)
