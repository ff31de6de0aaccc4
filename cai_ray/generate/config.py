"""`cai-ray generate`'s config (SL-CAI data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cai_ray.config import ConfigError, setting
from cai_ray.config.sections import EngineConfig, InputConfig, OutputConfig, PoolConfig, SamplingConfig


@dataclass(frozen=True)
class GenerateConfig:
    """`cai-ray generate`: SL-CAI data (answer → critique → revise ×N)."""

    input: str = setting(
        "",
        "prompt file or folder: JSONL (prompt|messages), Parquet, CSV, HF dataset on disk; "
        "or a cloud URI (s3://bucket/prefix/, gs://...) of JSONL/Parquet/CSV shards",
    )
    output: str = setting(
        "", "output folder or object-store prefix (s3://, gs://): data/*.parquet, rejects.jsonl, manifest.json"
    )
    constitution: str = setting("constitutions/general.yaml", "constitution YAML file")
    revisions: int = setting(4, "critique/revision rounds per prompt (paper: 4)")
    critique: bool = setting(True, "false = direct revision without a critique")
    few_shot: int | None = setting(None, "critique/revision examples from the constitution; null = all")
    seed: int = setting(0, "seeds principle sampling (per row) and generation")
    async_chains: bool = setting(
        True,
        "vllm: each row's answer → critique → revise chain is its own request stream "
        "(rows never wait for each other); false = the batch moves step by step",
    )
    ray_address: str | None = setting(
        None, "join this Ray cluster (e.g. auto, ray://host:10001); default: start a local one"
    )
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "the LLM engine"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "generation settings"})
    pool: PoolConfig = field(default_factory=PoolConfig, metadata={"help": "Ray Data actor pool and task resources"})
    inputs: InputConfig = field(default_factory=InputConfig, metadata={"help": "input limits"})
    outputs: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "output layout"})

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input: required (a prompt file or folder)")
        if not self.output:
            raise ConfigError("output: required (an output folder)")
        if self.revisions < 1:
            raise ConfigError("revisions: must be >= 1")
        if self.few_shot is not None and self.few_shot < 0:
            raise ConfigError("few_shot: must be >= 0 or null")
        for name in ("engine", "sampling", "pool", "inputs", "outputs"):
            getattr(self, name).validate(name)
        self.engine.check_gpus("pool.gpus_per_actor", self.pool.gpus_per_actor)
