"""`cai-ray label`'s config (RL-CAI preference labels)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cai_ray.config import ConfigError, setting
from cai_ray.config.sections import EngineConfig, InputConfig, LabelerConfig, OutputConfig, PoolConfig, SamplingConfig


@dataclass(frozen=True)
class PairsConfig:
    samples: int = setting(2, "answers sampled per prompt from the policy (k >= 2); identical answers are deduplicated")
    pairing: str = setting(
        "all", "all = every pair of distinct answers (k(k-1)/2) | disjoint = k/2 pairs (1-2, 3-4, ...)"
    )

    def validate(self, where: str) -> None:
        if self.samples < 2:
            raise ConfigError(f"{where}.samples: must be >= 2, got {self.samples}")
        if self.pairing not in ("all", "disjoint"):
            raise ConfigError(f"{where}.pairing: must be all or disjoint, got {self.pairing!r}")


@dataclass(frozen=True)
class FilterConfig:
    min_margin: float = setting(0.0, "pairs with |p_a - 0.5| below this go to filtered/ instead of data/")
    drop_inconsistent: bool = setting(False, "pairs whose two orders disagree go to filtered/ (needs both_orders)")

    def validate(self, where: str) -> None:
        if not 0 <= self.min_margin <= 0.5:
            raise ConfigError(f"{where}.min_margin: must be in [0, 0.5], got {self.min_margin}")


@dataclass(frozen=True)
class ReviewConfig:
    fraction: float = setting(
        0.05, "at most this share of the pairs goes to review/queue.jsonl for people (0 = no queue)"
    )
    max_rows: int = setting(1000, "and at most this many")
    margin: float = setting(0.1, "a label with |p_a - 0.5| below this is unsure (a reason to review it)")
    spread: float = setting(
        0.15, "a label whose principles' probabilities vary by a standard deviation above this is unsure"
    )

    def validate(self, where: str) -> None:
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"{where}.fraction: must be in [0, 1], got {self.fraction}")
        if self.max_rows < 0:
            raise ConfigError(f"{where}.max_rows: must be >= 0, got {self.max_rows}")
        if not 0 <= self.margin <= 0.5:
            raise ConfigError(f"{where}.margin: must be in [0, 0.5], got {self.margin}")
        if not 0 <= self.spread <= 0.5:
            raise ConfigError(f"{where}.spread: must be in [0, 0.5], got {self.spread}")


@dataclass(frozen=True)
class LabelConfig:
    """`cai-ray label`: RL-CAI preference labels (RLAIF) from an AI labeler."""

    # `label` named the method beside `labeler`, its model; renamed for one release
    DEPRECATED = {"label": ("method",)}

    input: str = setting(
        "",
        "prompts (the policy samples k answers each) or ready-made pairs (prompt|messages, response_a, "
        "response_b): a file, a folder or a cloud URI (s3://bucket/prefix/)",
    )
    output: str = setting(
        "",
        "output folder or object-store prefix (s3://, gs://): data/ and filtered/ Parquet, rejects.jsonl, manifest.json",
    )
    constitution: str = setting(
        "constitutions/general.yaml", "constitution YAML file (comparison questions and examples)"
    )
    constitution_field: str | None = setting(
        None,
        "several constitutions in one run: the row field (e.g. category) whose value picks a row's "
        "constitution from `constitutions`; rows with another value (or none) take `constitution`",
    )
    constitutions: str | None = setting(
        None, "with constitution_field: VALUE=FILE pairs, comma-separated (e.g. cyber=constitutions/cyber.yaml)"
    )
    gold: str | None = setting(
        None,
        "pairs with a known answer (prompt|messages, chosen, rejected): labelled too, to measure accuracy and calibration",
    )
    seed: int = setting(0, "seeds principle sampling, pair order and generation")
    ray_address: str | None = setting(None, "join this Ray cluster (e.g. auto); default: start a local one")
    policy: EngineConfig = field(
        default_factory=lambda: EngineConfig(model=""),
        metadata={"help": "the policy that samples answers; model '' = the input holds ready-made pairs"},
    )
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0),
        metadata={"help": "policy sampling (paper: temperature 1)"},
    )
    pairs: PairsConfig = field(default_factory=PairsConfig, metadata={"help": "how answers become pairs"})
    labeler: EngineConfig = field(
        default_factory=EngineConfig, metadata={"help": "the AI labeler (may be stronger than the policy)"}
    )
    method: LabelerConfig = field(
        default_factory=LabelerConfig,
        metadata={
            "help": "the labeling method (principles per pair, both orders, few-shot, CoT); `labeler` is its model"
        },
    )
    filter: FilterConfig = field(default_factory=FilterConfig, metadata={"help": "which labelled pairs are kept"})
    review: ReviewConfig = field(
        default_factory=ReviewConfig,
        metadata={"help": "the labels the AI is least sure of, queued for people (review/; `cai-ray review`)"},
    )
    policy_pool: PoolConfig = field(
        default_factory=lambda: PoolConfig(cpus_per_actor=0.5),
        metadata={"help": "actor pool of the policy (sampling)"},
    )
    labeler_pool: PoolConfig = field(
        default_factory=lambda: PoolConfig(cpus_per_actor=1.0),
        metadata={"help": "actor pool of the labeler; its batch_size/task_cpus also shape reading"},
    )
    inputs: InputConfig = field(default_factory=InputConfig, metadata={"help": "input limits"})
    outputs: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "output layout"})

    @property
    def samples_answers(self) -> bool:
        return bool(self.policy.model)

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input: required (a prompt or pair file or folder)")
        if not self.output:
            raise ConfigError("output: required (an output folder)")
        if self.gold and "://" in self.output:
            raise ConfigError(
                "gold: the gold-set check writes to a local output folder; not with an object-store output"
            )
        if bool(self.constitution_field) != bool(self.constitutions):
            raise ConfigError(
                "constitution_field and constitutions go together: the row field, and VALUE=FILE pairs for its values"
            )
        from cai_ray.core.constitution import constitution_map

        try:
            constitution_map(self.constitutions)  # a malformed mapping fails here
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in ("sampling", "pairs", "labeler", "method", "filter", "review", "labeler_pool", "inputs", "outputs"):
            getattr(self, name).validate(name)
        if self.samples_answers:
            self.policy.validate("policy")
            self.policy_pool.validate("policy_pool")
        if self.filter.drop_inconsistent and not self.method.both_orders:
            raise ConfigError(
                "filter.drop_inconsistent: needs method.both_orders=true (one order cannot be inconsistent)"
            )
        for eng, pool in (("policy", "policy_pool"), ("labeler", "labeler_pool")):
            getattr(self, eng).check_gpus(f"{pool}.gpus_per_actor", getattr(self, pool).gpus_per_actor)
