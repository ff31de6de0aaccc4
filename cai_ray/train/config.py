"""The trainers' configs: the sections every trainer shares (scaling, optimiser, checkpoints,
LoRA) and `train sft`, `train rm`, `train dpo`'s own."""

from __future__ import annotations

from dataclasses import dataclass, field

from cai_ray.config import ConfigError, positive, setting

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement group strategies


@dataclass(frozen=True)
class ScalingSection:
    workers: int = setting(1, "Ray Train workers (one process each; a GPU each when use_gpu)")
    use_gpu: bool | None = setting(None, "null = use GPUs when the cluster has them")
    cpus_per_worker: float = setting(1.0, "CPUs reserved per worker")
    placement_strategy: str = setting(
        "PACK",
        "where the workers go (Ray placement group): PACK = as few nodes as fit | SPREAD = across nodes "
        "| STRICT_SPREAD = one per node | STRICT_PACK = all on one node",
    )

    def validate(self, where: str) -> None:
        positive(where, "workers", self.workers)
        positive(where, "cpus_per_worker", self.cpus_per_worker)
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(
                f"{where}.placement_strategy: must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                f"got {self.placement_strategy!r}"
            )


@dataclass(frozen=True)
class OptimSection:
    epochs: float = setting(1.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = setting(-1, "optimizer steps; -1 = from epochs")
    learning_rate: float = setting(2e-5, "peak learning rate (AdamW)")
    per_worker_batch_size: int = setting(4, "rows per worker per step")
    grad_accum: int = setting(1, "gradient accumulation steps")
    max_length: int = setting(1024, "tokens per row; longer rows are truncated (counted in the manifest)")
    warmup_ratio: float = setting(0.0, "share of steps with linear warm-up")
    dtype: str = setting("auto", "auto (bf16 on GPU, float32 on CPU) | float32 | bfloat16")

    def validate(self, where: str) -> None:
        positive(where, "learning_rate", self.learning_rate)
        positive(where, "per_worker_batch_size", self.per_worker_batch_size)
        positive(where, "grad_accum", self.grad_accum)
        positive(where, "max_length", self.max_length)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1)")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError(f"{where}: set epochs > 0 or max_steps > 0")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"{where}.dtype: must be auto, float32 or bfloat16")


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = setting(50, "save a checkpoint (reported to Ray Train) every N optimizer steps")
    keep: int = setting(2, "checkpoints kept in the storage path")
    max_failures: int = setting(0, "worker failures Ray Train recovers from (restarting from the last checkpoint)")
    storage: str | None = setting(None, "Ray Train storage path (local folder or cloud URI); default OUTPUT/ray")

    def validate(self, where: str) -> None:
        positive(where, "every_steps", self.every_steps)
        positive(where, "keep", self.keep)
        if self.max_failures < -1:
            raise ConfigError(f"{where}.max_failures: must be >= -1 (-1 = unlimited)")


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = setting(False, "train LoRA adapters (peft) instead of all weights")
    r: int = setting(16, "adapter rank")
    alpha: int = setting(32, "adapter scaling (lora_alpha)")
    dropout: float = setting(0.05, "adapter dropout")
    target_modules: str = setting(
        "all-linear", "modules to adapt: all-linear, or comma-separated names (q_proj,v_proj)"
    )
    merge: bool = setting(
        True,
        "merge the adapters into the weights on save (OUTPUT/model is a plain model); "
        "false = OUTPUT/model holds the adapter only",
    )

    def validate(self, where: str) -> None:
        positive(where, "r", self.r)
        positive(where, "alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1)")
        if not self.target_modules.strip():
            raise ConfigError(f"{where}.target_modules: empty")


@dataclass(frozen=True)
class TrainConfig:
    """What every trainer shares: data, model, ZeRO, workers, optimiser, checkpoints, LoRA."""

    data: str = setting("", "input folder or JSONL/Parquet file")
    output: str = setting(
        "", "output folder: model/ (a plain HF model), metrics.json, loss.png, manifest.json, rejects.jsonl"
    )
    model: str = setting("smollm2", "base model: smollm2 | tiny-random[:SEED] | a model folder | a hub id")
    seed: int = setting(0, "seeds data order, splits and initialisation")
    zero: int = setting(2, "DeepSpeed ZeRO stage 0-3 (0 = plain DDP)")
    offload: bool = setting(False, "ZeRO >= 2: offload optimizer (and ZeRO-3 parameters) to CPU memory")
    ray_address: str | None = setting(None, "join this Ray cluster; default: start a local one")
    scaling: ScalingSection = field(default_factory=ScalingSection, metadata={"help": "Ray Train workers"})
    optim: OptimSection = field(default_factory=OptimSection, metadata={"help": "optimisation"})
    checkpoint: CheckpointSection = field(
        default_factory=CheckpointSection, metadata={"help": "checkpoints and fault tolerance"}
    )
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "LoRA adapters (peft)"})

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("data: required (an input folder or a file)")
        if not self.output:
            raise ConfigError("output: required (an output folder)")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero: must be 0, 1, 2 or 3, got {self.zero}")
        for name in ("scaling", "optim", "checkpoint", "lora"):
            getattr(self, name).validate(name)


@dataclass(frozen=True)
class SFTTrainConfig(TrainConfig):
    """`cai-ray train sft`: supervised fine-tuning on the SL-CAI revisions (Ray Train + DeepSpeed)."""

    data: str = setting(
        "", "SL-CAI output folder (data/*.parquet) or JSONL/Parquet with messages, or prompt + completion"
    )
    mix: str | None = setting(
        None,
        "FILE:RATIO - mix helpfulness rows (same formats as data) in, as RATIO of the "
        "mixed set (0.25 = one row in four); sampled without replacement, repeated only "
        "when the file is too small (counted in the manifest)",
    )

    def validate(self) -> None:
        super().validate()
        if self.mix is not None:
            parse_mix(self.mix)


def parse_mix(spec: str) -> tuple[str, float]:
    """``FILE:RATIO`` → (file, ratio in (0, 1))."""
    path, sep, raw = spec.rpartition(":")
    try:
        ratio = float(raw)
    except ValueError:
        ratio = None
    if not sep or not path or ratio is None or not 0 < ratio < 1:
        raise ConfigError(f"mix: expected FILE:RATIO with 0 < RATIO < 1 (share of the mixed set), got {spec!r}")
    return path, ratio


@dataclass(frozen=True)
class RMTrainConfig(TrainConfig):
    """`cai-ray train rm`: a preference (reward) model on AI labels (Ray Train + DeepSpeed)."""

    data: str = setting(
        "", "labeling output folder (data/*.parquet) or JSONL/Parquet with prompt, chosen, rejected [, p_chosen]"
    )
    targets: str = setting(
        "auto",
        "soft: cross-entropy against p_chosen (the CAI paper's soft labels) | hard: "
        "Bradley-Terry on chosen > rejected | auto: soft when the rows carry p_chosen",
    )
    eval_fraction: float = setting(0.1, "share of pairs held out (seeded by pair id) for accuracy and calibration")
    human_labels: str = setting(
        "auto",
        "people's labels (`cai-ray review`) that take precedence over the AI's for the same pair: "
        "auto = the data folder's review/ when it has labels | a label run's output folder | none",
    )

    def validate(self) -> None:
        super().validate()
        if self.targets not in ("auto", "soft", "hard"):
            raise ConfigError(f"targets: must be auto, soft or hard, got {self.targets!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")


DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)  # TRL's DPOConfig


@dataclass(frozen=True)
class DPOTrainConfig(TrainConfig):
    """`cai-ray train dpo`: Direct Preference Optimisation on AI labels (TRL DPOTrainer)."""

    data: str = setting("", "labeling output folder (data/*.parquet) or JSONL/Parquet with prompt, chosen, rejected")
    beta: float = setting(0.1, "DPO temperature: how far the policy may move from the reference model")
    loss_type: str = setting("sigmoid", "TRL DPO loss: sigmoid (DPO) | ipo | hinge | robust | ...")
    label_smoothing: float = setting(0.0, "conservative DPO: assumed share of wrong labels (sigmoid loss only)")
    human_labels: str = setting(
        "auto",
        "people's labels (`cai-ray review`) that take precedence over the AI's for the same pair: "
        "auto = the data folder's review/ when it has labels | a label run's output folder | none",
    )

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"loss_type: must be one of {', '.join(DPO_LOSSES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")


@dataclass(frozen=True)
class ClassifierTrainConfig(TrainConfig):
    """`cai-ray train classifier`: a constitutional classifier (P(violation) from one logit),
    as `cai-ray classifiers` trains its input and output classifiers (Ray Train + DeepSpeed)."""

    data: str = setting("", "JSONL/Parquet with text and target (1 = violates, 0 = respects; soft targets allowed)")
    model: str = setting("smollm2", "base model (a classification head is added): smollm2 | tiny-random | a folder")
    zero: int = setting(0, "DeepSpeed ZeRO stage 0-3 (0 = plain DDP: a small classifier needs no sharding)")
    optim: OptimSection = field(
        default_factory=lambda: OptimSection(learning_rate=5e-5, per_worker_batch_size=8, max_length=512, epochs=2.0),
        metadata={"help": "optimisation"},
    )
