"""`cai-ray eval`'s config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cai_ray.config import ConfigError, positive, setting
from cai_ray.config.sections import EngineConfig, InputConfig, OutputConfig, PoolConfig, SamplingConfig


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    """`cai-ray eval`: harmlessness, over-refusal, helpfulness win-rate and Elo of several models,
    judged by an AI judge against the constitution."""

    models: list[str] = setting(
        None, "models to evaluate: MODEL or NAME=MODEL (smollm2 | tiny-random[:SEED] | a model folder)"
    )
    baseline: str | None = setting(
        None,
        "the model the others are compared with (a NAME or MODEL of `models`, or another "
        "model, which is then evaluated too); default: the first model",
    )
    harmful: str = setting("", "red-team prompts (JSONL/Parquet: prompt|messages [, id, category])")
    benign: str = setting("", "benign prompts (same format): over-refusal and helpfulness")
    output: str = setting(
        "",
        "output folder or object-store prefix (s3://, gs://): metrics.json, report.html + PNGs, answers.jsonl, "
        "comparisons.jsonl, answers/, judgements/, manifest.json",
    )
    constitution: str = setting("constitutions/general.yaml", "constitution whose principles define harm for the judge")
    constitution_field: str | None = setting(
        None,
        "several constitutions in one run: the red-team row field (e.g. category) whose value picks the "
        "constitution its answers are judged by, from `constitutions`; other rows take `constitution`",
    )
    constitutions: str | None = setting(
        None, "with constitution_field: VALUE=FILE pairs, comma-separated (e.g. minors=constitutions/tutor.yaml)"
    )
    limit: int | None = setting(None, "evaluate only the first N prompts of each file (smoke runs)")
    columns: str | None = setting(
        None,
        "map your files' columns: prompt=goal,category=harm_type,source=dataset (without it: prompt, messages, "
        "else goal / forbidden_prompt / text; category and source when present)",
    )
    seed: int = setting(0, "seeds principle sampling and the bootstrap")
    bootstrap: int = setting(2000, "bootstrap resamples of the prompts behind every rate's 95% interval")
    bootstrap_elo: int = setting(200, "bootstrap resamples (Elo refitted each time) behind the Elo intervals")
    ray_address: str | None = setting(None, "join this Ray cluster; default: start a local one")
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(model=""),
        metadata={"help": "how the evaluated models run (backend, dtype, ...); the models come from `models`"},
    )
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=128),
        metadata={"help": "answer generation (default greedy)"},
    )
    judge: EngineConfig = field(
        default_factory=EngineConfig, metadata={"help": "the AI judge (the labeler model, or a stronger one)"}
    )
    judge_principles: int = setting(
        1, "principles per harmful answer (those of the prompt's category first, then sampled)"
    )
    per_principle: bool = setting(
        True,
        "judge every red-team answer against every principle too (a principle x model table of violation rates; "
        "costs red-team answers x models x principles judgements, 2 judge calls each) and run the constitution's "
        "probe prompts; false: only the judge_principles",
    )
    few_shot: int | None = setting(
        None, "comparison examples from the constitution in harmlessness comparisons; null = all"
    )
    pool: PoolConfig = field(
        default_factory=PoolConfig,
        metadata={"help": "Ray Data actor pool of each evaluated model (its answers), one model at a time"},
    )
    judge_pool: PoolConfig = field(
        default_factory=PoolConfig,
        metadata={"help": "Ray Data actor pool of the judge (a bigger model: its own GPUs per actor)"},
    )
    inputs: InputConfig = field(default_factory=InputConfig, metadata={"help": "input limits"})
    outputs: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "answer/judgement part sizes"})

    # the keys of one engine actor per model in turn (before Ray Data pools): still read
    DEPRECATED = {
        "batch_size": ("pool.batch_size", "judge_pool.batch_size"),
        "cpus_per_engine": ("pool.cpus_per_actor", "judge_pool.cpus_per_actor"),
        "gpus_per_engine": ("pool.gpus_per_actor", "judge_pool.gpus_per_actor"),
    }

    def validate(self) -> None:
        from cai_ray.core.constitution import constitution_map

        if bool(self.constitution_field) != bool(self.constitutions):
            raise ConfigError(
                "constitution_field and constitutions go together: the row field, and VALUE=FILE pairs for its values"
            )
        try:
            constitution_map(self.constitutions)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.models:
            raise ConfigError("models: required (at least one MODEL or NAME=MODEL)")
        for key in ("harmful", "benign", "output"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required")
        if self.engine.model:
            raise ConfigError(
                "engine.model: the evaluated models come from `models` (--model); leave engine.model empty"
            )
        for key in ("bootstrap", "bootstrap_elo"):
            if getattr(self, key) < 10:
                raise ConfigError(f"{key}: at least 10 resamples, got {getattr(self, key)}")
        self.engine.validate("engine")
        self.judge.validate("judge")
        self.sampling.validate("sampling")
        self.inputs.validate("inputs")
        positive("", "judge_principles", self.judge_principles)
        for name in ("pool", "judge_pool", "outputs"):
            getattr(self, name).validate(name)
        if self.limit is not None:
            positive("", "limit", self.limit)
        if self.few_shot is not None and self.few_shot < 0:
            raise ConfigError("few_shot: must be >= 0 or null")
        self.engine.check_gpus("pool.gpus_per_actor", self.pool.gpus_per_actor)
        self.judge.check_gpus("judge_pool.gpus_per_actor", self.judge_pool.gpus_per_actor)
        names = [parse_model_spec(m)[0] for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"models: two models named {', '.join(dup)}; name them: NAME=MODEL")


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``NAME=MODEL`` or ``MODEL`` → (name, model). A folder ending in model/ (a trainer's
    output) is named after its parent: ``out/sft/model`` → ``sft``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"models: empty model entry {spec!r}")
    name, sep, model = spec.partition("=")
    if sep:
        if not name.strip() or not model.strip():
            raise ConfigError(f"models: {spec!r}: expected NAME=MODEL")
        return name.strip(), model.strip()
    p = Path(spec.rstrip("/"))
    return (p.parent.name if p.name == "model" and p.parent.name else p.name or spec), spec
