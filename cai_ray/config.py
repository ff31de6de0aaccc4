"""Typed configs: one YAML file + dotted ``key=value`` overrides, validated strictly.

Every field has help text (``field(metadata={"help": ...})``). Unknown keys are errors with
a suggestion; values of the wrong type are errors, never coerced (an int may stand for a
float, nothing else). Components take plain values, not config objects: the job converts
at the edge.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def _f(default, help: str):
    """A scalar field with its help text (shown by ``--help`` and ``describe``)."""
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------
@dataclass
class EngineConfig:
    backend: str = _f("hf", "engine backend: hf (transformers, CPU/GPU) | vllm (GPU) | noop (benchmarks only)")
    model: str = _f("smollm2", "smollm2 | tiny-random[:SEED] | a local HF model folder | a hub id (org/name)")
    dtype: str = _f("bfloat16", "float32 | bfloat16 | float16 | auto (bfloat16 is ~2x float32 on this CPU)")
    threads: int | None = _f(None, "torch threads per engine actor on CPU; default: node CPUs / max actors")
    max_batch_size: int = _f(32, "hf: conversations per forward pass (micro-batch)")
    prefix_cache: bool = _f(True, "hf: prefill the tokens a micro-batch shares (few-shot turns) once and reuse the KV cache")
    tensor_parallel_size: int = _f(1, "vllm: GPUs per engine actor")
    gpu_memory_utilization: float = _f(0.9, "vllm: share of GPU memory for weights + KV cache")
    max_model_len: int | None = _f(None, "vllm: context length override")

    def validate(self, where: str) -> None:
        if self.backend not in ("hf", "vllm", "noop"):
            raise ConfigError(f"{where}.backend: must be hf, vllm or noop, got {self.backend!r}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ConfigError(f"{where}.dtype: must be float32, bfloat16, float16 or auto")
        _positive(where, "max_batch_size", self.max_batch_size)
        _positive(where, "tensor_parallel_size", self.tensor_parallel_size)
        if self.threads is not None:
            _positive(where, "threads", self.threads)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization: must be in (0, 1]")

    def engine_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model, "dtype": self.dtype}
        if self.backend == "hf":
            kw.update(threads=self.threads, max_batch_size=self.max_batch_size, prefix_cache=self.prefix_cache)
        elif self.backend == "vllm":
            kw.update(
                tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
            )
        return kw


@dataclass
class SamplingConfig:
    temperature: float = _f(0.7, "0 = greedy")
    top_p: float = _f(0.95, "nucleus sampling mass")
    max_new_tokens: int = _f(256, "tokens per generated answer, critique and revision")
    min_new_tokens: int = _f(0, "force at least this many tokens (benchmarks: equal token budgets)")

    def validate(self, where: str) -> None:
        if self.temperature < 0:
            raise ConfigError(f"{where}.temperature: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p: must be in (0, 1]")
        _positive(where, "max_new_tokens", self.max_new_tokens)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"{where}.min_new_tokens: must be in [0, max_new_tokens]")


@dataclass
class PoolConfig:
    min_actors: int = _f(1, "engine actors at least (Ray Data autoscales between min and max)")
    max_actors: int = _f(1, "engine actors at most")
    cpus_per_actor: float = _f(1.0, "CPUs reserved per engine actor; fractional so a small node never deadlocks")
    gpus_per_actor: float = _f(0.0, "GPUs per engine actor (vllm: = tensor_parallel_size)")
    batch_size: int = _f(16, "rows per engine actor task (the unit of work, of retry after a crash, and of actor load balancing)")
    task_cpus: float = _f(0.25, "CPUs reserved per read / validate / write task")
    object_store_gb: float | None = _f(None, "cap on object-store memory this job's data in flight may use (Ray Data resource limit); null = Ray's default share")

    def validate(self, where: str) -> None:
        _positive(where, "min_actors", self.min_actors)
        _positive(where, "batch_size", self.batch_size)
        if self.max_actors < self.min_actors:
            raise ConfigError(f"{where}.max_actors: must be >= min_actors ({self.min_actors})")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ConfigError(f"{where}: cpus_per_actor and gpus_per_actor must be >= 0")
        if not 0 < self.task_cpus <= 64:
            raise ConfigError(f"{where}.task_cpus: must be in (0, 64]")
        if self.object_store_gb is not None and self.object_store_gb <= 0:
            raise ConfigError(f"{where}.object_store_gb: must be > 0 or null")


@dataclass
class InputConfig:
    max_prompt_chars: int = _f(32000, "longer prompts are rejected before tokenization")

    def validate(self, where: str) -> None:
        _positive(where, "max_prompt_chars", self.max_prompt_chars)


@dataclass
class OutputConfig:
    rows_per_file: int = _f(256, "rows per Parquet part; smaller = finer-grained resume, more files")

    def validate(self, where: str) -> None:
        _positive(where, "rows_per_file", self.rows_per_file)


@dataclass
class GenerateConfig:
    """`cai-ray generate`: SL-CAI data (answer → critique → revise ×N)."""

    input: str = _f("", "prompt file or folder: JSONL (prompt|messages), Parquet, CSV, HF dataset on disk")
    output: str = _f("", "output folder (data/*.parquet, rejects.jsonl, manifest.json)")
    constitution: str = _f("constitutions/general.yaml", "constitution YAML file")
    revisions: int = _f(4, "critique/revision rounds per prompt (paper: 4)")
    critique: bool = _f(True, "false = direct revision without a critique")
    few_shot: int | None = _f(None, "critique/revision examples from the constitution; null = all")
    seed: int = _f(0, "seeds principle sampling (per row) and generation")
    ray_address: str | None = _f(None, "join this Ray cluster (e.g. auto, ray://host:10001); default: start a local one")
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
        if self.engine.backend == "vllm" and self.pool.gpus_per_actor < self.engine.tensor_parallel_size:
            raise ConfigError(
                "pool.gpus_per_actor: the vllm engine needs tensor_parallel_size "
                f"({self.engine.tensor_parallel_size}) GPUs per actor, got {self.pool.gpus_per_actor}"
            )


def _positive(where: str, key: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{where}.{key}: must be > 0, got {value!r}")


# ---------------------------------------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " | ".join("null" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from a nested dict: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; known: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, path)
        elif not _type_ok(value, tp):
            raise ConfigError(f"config key {path!r} expects {_type_name(tp)}, got {value!r}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], dotted: str) -> None:
    """``a.b=value`` into a nested dict; the value is parsed as YAML (1, 0.5, true, null)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r}: expected key=value")
    key, raw = dotted.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {dotted!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted!r}: cannot parse value: {e}") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple = (),
                flags: dict[str, Any] | None = None):
    """defaults < YAML file < CLI flags < dotted overrides; then ``validate()``."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
    for key, value in (flags or {}).items():
        if value is not None:
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg


def describe(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, nested sections flattened: for --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
