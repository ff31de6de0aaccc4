"""Typed configs: one YAML file + dotted ``key=value`` overrides, validated strictly.

Every field has help text (``field(metadata={"help": ...})``). Unknown keys are errors with
a suggestion; values of the wrong type are errors, never coerced (an int may stand for a
float, nothing else). Components take plain values, not config objects: the job converts
at the edge.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-3`` (no dot) as a string; learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _f(default, help: str):
    """A scalar field with its help text (shown by ``--help`` and ``describe``)."""
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------
@dataclass
class EngineConfig:
    backend: str = _f(
        "hf",
        "engine backend: hf (transformers, CPU/GPU) | vllm (vLLM's async engine; GPU, or its CPU build) | openai (an OpenAI-compatible "
        "endpoint, e.g. vLLM or cai-ray serve) | noop (benchmarks only)",
    )
    model: str = _f(
        "smollm2",
        "smollm2 | tiny-random[:SEED] | a local HF model folder | a hub id (org/name); openai: the served model id",
    )
    dtype: str = _f("bfloat16", "float32 | bfloat16 | float16 | auto (bfloat16 is ~2x float32 on this CPU)")
    threads: int | None = _f(None, "torch threads per engine actor on CPU; default: node CPUs / max actors")
    max_batch_size: int = _f(32, "hf: conversations per forward pass (micro-batch)")
    prefix_cache: bool = _f(
        True,
        "prefill the tokens prompts share (few-shot turns) once and reuse the KV cache "
        "(hf: per micro-batch; vllm: its automatic prefix caching)",
    )
    enforce_eager: bool = _f(
        True,
        "vllm: eager mode; false = torch.compile / CUDA graphs (slower start-up, measured ~15% more tokens/s on CPU)",
    )
    kv_cache_gb: float | None = _f(
        None, "vllm on CPU: KV cache GiB per engine (default 1); on GPUs gpu_memory_utilization sizes it"
    )
    max_num_seqs: int | None = _f(None, "vllm: requests the engine runs at once (its batch); null = vLLM's default")
    tensor_parallel_size: int = _f(1, "vllm: GPUs per engine actor")
    gpu_memory_utilization: float = _f(0.9, "vllm: share of GPU memory for weights + KV cache")
    max_model_len: int | None = _f(
        None, "vllm: context length override; openai: the context when the endpoint does not report it"
    )
    base_url: str | None = _f(None, "openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = _f(
        "OPENAI_API_KEY", "openai: environment variable holding the API key (cai-ray serve: CAI_RAY_API_KEY)"
    )
    concurrency: int = _f(8, "openai: requests in flight per engine actor")
    request_timeout_s: float = _f(300.0, "openai: seconds per request before it is retried")

    def validate(self, where: str) -> None:
        if self.backend not in ("hf", "vllm", "openai", "noop"):
            raise ConfigError(f"{where}.backend: must be hf, vllm, openai or noop, got {self.backend!r}")
        if self.backend == "openai":
            if not self.base_url or not re.match(r"^https?://[^/\s]+", self.base_url):
                raise ConfigError(
                    f"{where}.base_url: backend openai needs the endpoint's URL, e.g. "
                    f"http://127.0.0.1:8000/v1 (got {self.base_url!r})"
                )
            if not self.model:
                raise ConfigError(f"{where}.model: backend openai needs the served model id")
            _positive(where, "concurrency", self.concurrency)
            _positive(where, "request_timeout_s", self.request_timeout_s)
        elif self.base_url is not None:
            raise ConfigError(f"{where}.base_url: only backend openai uses it (backend is {self.backend!r})")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ConfigError(f"{where}.dtype: must be float32, bfloat16, float16 or auto")
        _positive(where, "max_batch_size", self.max_batch_size)
        _positive(where, "tensor_parallel_size", self.tensor_parallel_size)
        if self.threads is not None:
            _positive(where, "threads", self.threads)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization: must be in (0, 1]")
        if self.kv_cache_gb is not None and self.kv_cache_gb < 1:
            raise ConfigError(f"{where}.kv_cache_gb: must be >= 1 (whole GiB) or null")
        if self.max_num_seqs is not None:
            _positive(where, "max_num_seqs", self.max_num_seqs)

    def check_gpus(self, where: str, gpus: float) -> None:
        """vLLM with tensor parallelism needs that many GPUs; with none it runs on CPU
        (its CPU build), one engine per actor."""
        if self.backend != "vllm":
            return
        if gpus < self.tensor_parallel_size and (gpus > 0 or self.tensor_parallel_size > 1):
            raise ConfigError(
                f"{where}: the vllm engine needs tensor_parallel_size ({self.tensor_parallel_size}) "
                f"GPUs per actor, got {gpus:g}"
            )

    def engine_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model, "dtype": self.dtype}
        if self.backend == "hf":
            kw.update(threads=self.threads, max_batch_size=self.max_batch_size, prefix_cache=self.prefix_cache)
        elif self.backend == "vllm":
            kw.update(
                tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                threads=self.threads,
                prefix_cache=self.prefix_cache,
                enforce_eager=self.enforce_eager,
                kv_cache_gb=self.kv_cache_gb,
                max_num_seqs=self.max_num_seqs,
            )
        elif self.backend == "openai":
            return {
                "model": self.model,
                "base_url": self.base_url,
                "api_key_env": self.api_key_env,
                "max_model_len": self.max_model_len,
                "concurrency": self.concurrency,
                "request_timeout_s": self.request_timeout_s,
            }
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
    batch_size: int = _f(
        16, "rows per engine actor task (the unit of work, of retry after a crash, and of actor load balancing)"
    )
    task_cpus: float = _f(0.25, "CPUs reserved per read / validate / write task")
    object_store_gb: float | None = _f(
        None,
        "cap on object-store memory this job's data in flight may use (Ray Data resource limit); null = Ray's default share",
    )

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

    input: str = _f(
        "",
        "prompt file or folder: JSONL (prompt|messages), Parquet, CSV, HF dataset on disk; "
        "or a cloud URI (s3://bucket/prefix/, gs://...) of JSONL/Parquet/CSV shards",
    )
    output: str = _f(
        "", "output folder or object-store prefix (s3://, gs://): data/*.parquet, rejects.jsonl, manifest.json"
    )
    constitution: str = _f("constitutions/general.yaml", "constitution YAML file")
    revisions: int = _f(4, "critique/revision rounds per prompt (paper: 4)")
    critique: bool = _f(True, "false = direct revision without a critique")
    few_shot: int | None = _f(None, "critique/revision examples from the constitution; null = all")
    seed: int = _f(0, "seeds principle sampling (per row) and generation")
    async_chains: bool = _f(
        True,
        "vllm: each row's answer → critique → revise chain is its own request stream "
        "(rows never wait for each other); false = the batch moves step by step",
    )
    ray_address: str | None = _f(
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


@dataclass
class PairsConfig:
    samples: int = _f(2, "answers sampled per prompt from the policy (k >= 2); identical answers are deduplicated")
    pairing: str = _f("all", "all = every pair of distinct answers (k(k-1)/2) | disjoint = k/2 pairs (1-2, 3-4, ...)")

    def validate(self, where: str) -> None:
        if self.samples < 2:
            raise ConfigError(f"{where}.samples: must be >= 2, got {self.samples}")
        if self.pairing not in ("all", "disjoint"):
            raise ConfigError(f"{where}.pairing: must be all or disjoint, got {self.pairing!r}")


@dataclass
class LabelerConfig:
    principles_per_pair: int = _f(
        1, "principles sampled (seeded, distinct) per pair; their probabilities are averaged (ensemble)"
    )
    both_orders: bool = _f(True, "label every pair as (A,B) and (B,A) and average: position debiasing (RLAIF)")
    few_shot: int | None = _f(None, "comparison examples from the constitution; null = all")
    cot: bool = _f(False, "chain of thought: the labeler reasons first, then the choice is scored and clamped")
    clamp_low: float = _f(0.4, "CoT only: lower clamp of each probability (CAI paper: 0.4)")
    clamp_high: float = _f(0.6, "CoT only: upper clamp (CAI paper: 0.6)")
    cot_max_new_tokens: int = _f(192, "CoT only: token budget of the reasoning")
    cot_temperature: float = _f(0.0, "CoT only: sampling temperature of the reasoning (0 = greedy)")

    def validate(self, where: str) -> None:
        _positive(where, "principles_per_pair", self.principles_per_pair)
        _positive(where, "cot_max_new_tokens", self.cot_max_new_tokens)
        if self.few_shot is not None and self.few_shot < 0:
            raise ConfigError(f"{where}.few_shot: must be >= 0 or null")
        if not 0 <= self.clamp_low <= 0.5 <= self.clamp_high <= 1:
            raise ConfigError(
                f"{where}.clamp_low/clamp_high: need 0 <= low <= 0.5 <= high <= 1, "
                f"got ({self.clamp_low}, {self.clamp_high})"
            )
        if self.cot_temperature < 0:
            raise ConfigError(f"{where}.cot_temperature: must be >= 0")


@dataclass
class FilterConfig:
    min_margin: float = _f(0.0, "pairs with |p_a - 0.5| below this go to filtered/ instead of data/")
    drop_inconsistent: bool = _f(False, "pairs whose two orders disagree go to filtered/ (needs both_orders)")

    def validate(self, where: str) -> None:
        if not 0 <= self.min_margin <= 0.5:
            raise ConfigError(f"{where}.min_margin: must be in [0, 0.5], got {self.min_margin}")


@dataclass
class LabelConfig:
    """`cai-ray label`: RL-CAI preference labels (RLAIF) from an AI labeler."""

    # `label` named the method beside `labeler`, its model; renamed for one release
    DEPRECATED = {"label": ("method",)}

    input: str = _f(
        "",
        "prompts (the policy samples k answers each) or ready-made pairs (prompt|messages, response_a, "
        "response_b): a file, a folder or a cloud URI (s3://bucket/prefix/)",
    )
    output: str = _f(
        "",
        "output folder or object-store prefix (s3://, gs://): data/ and filtered/ Parquet, rejects.jsonl, manifest.json",
    )
    constitution: str = _f("constitutions/general.yaml", "constitution YAML file (comparison questions and examples)")
    gold: str | None = _f(
        None,
        "pairs with a known answer (prompt|messages, chosen, rejected): labelled too, to measure accuracy and calibration",
    )
    seed: int = _f(0, "seeds principle sampling, pair order and generation")
    ray_address: str | None = _f(None, "join this Ray cluster (e.g. auto); default: start a local one")
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
        for name in ("sampling", "pairs", "labeler", "method", "filter", "labeler_pool", "inputs", "outputs"):
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


@dataclass
class ScalingSection:
    workers: int = _f(1, "Ray Train workers (one process each; a GPU each when use_gpu)")
    use_gpu: bool | None = _f(None, "null = use GPUs when the cluster has them")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker")

    def validate(self, where: str) -> None:
        _positive(where, "workers", self.workers)
        _positive(where, "cpus_per_worker", self.cpus_per_worker)


@dataclass
class OptimSection:
    epochs: float = _f(1.0, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "optimizer steps; -1 = from epochs")
    learning_rate: float = _f(2e-5, "peak learning rate (AdamW)")
    per_worker_batch_size: int = _f(4, "rows per worker per step")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_length: int = _f(1024, "tokens per row; longer rows are truncated (counted in the manifest)")
    warmup_ratio: float = _f(0.0, "share of steps with linear warm-up")
    dtype: str = _f("auto", "auto (bf16 on GPU, float32 on CPU) | float32 | bfloat16")

    def validate(self, where: str) -> None:
        _positive(where, "learning_rate", self.learning_rate)
        _positive(where, "per_worker_batch_size", self.per_worker_batch_size)
        _positive(where, "grad_accum", self.grad_accum)
        _positive(where, "max_length", self.max_length)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1)")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError(f"{where}: set epochs > 0 or max_steps > 0")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"{where}.dtype: must be auto, float32 or bfloat16")


@dataclass
class CheckpointSection:
    every_steps: int = _f(50, "save a checkpoint (reported to Ray Train) every N optimizer steps")
    keep: int = _f(2, "checkpoints kept in the storage path")
    max_failures: int = _f(0, "worker failures Ray Train recovers from (restarting from the last checkpoint)")
    storage: str | None = _f(None, "Ray Train storage path (local folder or cloud URI); default OUTPUT/ray")

    def validate(self, where: str) -> None:
        _positive(where, "every_steps", self.every_steps)
        _positive(where, "keep", self.keep)
        if self.max_failures < -1:
            raise ConfigError(f"{where}.max_failures: must be >= -1 (-1 = unlimited)")


@dataclass
class LoraSection:
    enabled: bool = _f(False, "train LoRA adapters (peft) instead of all weights")
    r: int = _f(16, "adapter rank")
    alpha: int = _f(32, "adapter scaling (lora_alpha)")
    dropout: float = _f(0.05, "adapter dropout")
    target_modules: str = _f("all-linear", "modules to adapt: all-linear, or comma-separated names (q_proj,v_proj)")
    merge: bool = _f(
        True,
        "merge the adapters into the weights on save (OUTPUT/model is a plain model); "
        "false = OUTPUT/model holds the adapter only",
    )

    def validate(self, where: str) -> None:
        _positive(where, "r", self.r)
        _positive(where, "alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1)")
        if not self.target_modules.strip():
            raise ConfigError(f"{where}.target_modules: empty")


@dataclass
class TrainConfig:
    """What every trainer shares: data, model, ZeRO, workers, optimiser, checkpoints, LoRA."""

    data: str = _f("", "input folder or JSONL/Parquet file")
    output: str = _f(
        "", "output folder: model/ (a plain HF model), metrics.json, loss.png, manifest.json, rejects.jsonl"
    )
    model: str = _f("smollm2", "base model: smollm2 | tiny-random[:SEED] | a model folder | a hub id")
    seed: int = _f(0, "seeds data order, splits and initialisation")
    zero: int = _f(2, "DeepSpeed ZeRO stage 0-3 (0 = plain DDP)")
    offload: bool = _f(False, "ZeRO >= 2: offload optimizer (and ZeRO-3 parameters) to CPU memory")
    ray_address: str | None = _f(None, "join this Ray cluster; default: start a local one")
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


@dataclass
class SFTTrainConfig(TrainConfig):
    """`cai-ray train sft`: supervised fine-tuning on the SL-CAI revisions (Ray Train + DeepSpeed)."""

    data: str = _f("", "SL-CAI output folder (data/*.parquet) or JSONL/Parquet with messages, or prompt + completion")
    mix: str | None = _f(
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


@dataclass
class RMTrainConfig(TrainConfig):
    """`cai-ray train rm`: a preference (reward) model on AI labels (Ray Train + DeepSpeed)."""

    data: str = _f(
        "", "labeling output folder (data/*.parquet) or JSONL/Parquet with prompt, chosen, rejected [, p_chosen]"
    )
    targets: str = _f(
        "auto",
        "soft: cross-entropy against p_chosen (the CAI paper's soft labels) | hard: "
        "Bradley-Terry on chosen > rejected | auto: soft when the rows carry p_chosen",
    )
    eval_fraction: float = _f(0.1, "share of pairs held out (seeded by pair id) for accuracy and calibration")

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


@dataclass
class DPOTrainConfig(TrainConfig):
    """`cai-ray train dpo`: Direct Preference Optimisation on AI labels (TRL DPOTrainer)."""

    data: str = _f("", "labeling output folder (data/*.parquet) or JSONL/Parquet with prompt, chosen, rejected")
    beta: float = _f(0.1, "DPO temperature: how far the policy may move from the reference model")
    loss_type: str = _f("sigmoid", "TRL DPO loss: sigmoid (DPO) | ipo | hinge | robust | ...")
    label_smoothing: float = _f(0.0, "conservative DPO: assumed share of wrong labels (sigmoid loss only)")

    def validate(self) -> None:
        super().validate()
        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"loss_type: must be one of {', '.join(DPO_LOSSES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")


RL_ALGOS = ("ppo", "grpo", "rloo")
REWARD_SOURCES = ("auto", "model", "function", "labeler")


@dataclass
class RewardSection:
    # `label` named the method beside `labeler`, its model; renamed for one release
    DEPRECATED = {"label": ("method",)}

    source: str = _f(
        "auto",
        "model (a preference model folder) | function (a Python reward function) | labeler "
        "(d-RLAIF: the AI labeler compares each answer with a reference answer) | auto: the one set",
    )
    model: str | None = _f(
        None, "preference model folder (`cai-ray train rm` OUTPUT/model); also the value model's initialisation"
    )
    function: str | None = _f(
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
    constitution: str = _f("constitutions/general.yaml", "d-RLAIF: constitution of the labeler's comparisons")
    reference: str = _f(
        "policy",
        "d-RLAIF reference answer: policy (the frozen reference policy's greedy "
        "answer, once per prompt) | field (the prompt row's `reference`)",
    )
    length_penalty: float = _f(0.0, "subtracted from the score per response token")
    clip: float | None = _f(None, "clip scores to [-clip, clip] (null = no clipping)")

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
            _positive(where, "clip", self.clip)

    @property
    def kind(self) -> str:
        """model | function | labeler: the source in use."""
        if self.source != "auto":
            return self.source
        return "model" if self.model else "function" if self.function else "labeler"


@dataclass
class RolloutSection:
    engine: str = _f(
        "hf",
        "hf: generate with the training weights in the worker (no copy, no sync) | vllm: a "
        "colocated vLLM engine per worker, weights pushed into it after every update (GPU, or vLLM's CPU build)",
    )
    max_new_tokens: int = _f(128, "tokens per sampled response")
    temperature: float = _f(1.0, "sampling temperature (log-probabilities are taken at the same temperature)")
    top_p: float = _f(1.0, "nucleus sampling mass (1 = the exact policy distribution)")
    gpu_memory_utilization: float = _f(0.3, "vllm: share of GPU memory for its weights and KV cache")
    enforce_eager: bool = _f(True, "vllm: eager mode; false = torch.compile / CUDA graphs")
    check_sync: bool = _f(
        False,
        "vllm: after every weight sync, compare vLLM's greedy answers to the policy's own "
        "(metrics sync_greedy_match / sync_greedy_changed; costs two greedy passes)",
    )

    def validate(self, where: str) -> None:
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"{where}.engine: must be hf or vllm, got {self.engine!r}")
        _positive(where, "max_new_tokens", self.max_new_tokens)
        if self.temperature < GREEDY_TEMPERATURE:
            raise ConfigError(f"{where}.temperature: must be >= {GREEDY_TEMPERATURE} (RL samples; it cannot be greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p: must be in (0, 1]")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization: must be in (0, 1]")


GREEDY_TEMPERATURE = 0.05


@dataclass
class PPOSection:
    steps: int = _f(100, "RL steps (each: rollout, score, advantages, ppo_epochs of updates)")
    rollout_batch: int = _f(16, "prompts per step, over all workers (a multiple of the worker count)")
    group_size: int = _f(4, "grpo/rloo: answers per prompt (their baseline); ppo samples one")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    clip_range: float = _f(0.2, "PPO ratio clip epsilon")
    value_clip: float = _f(0.2, "value clip around the rollout's values")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    kl_coef: float = _f(
        0.05, "beta of the per-token KL penalty to the reference (SFT) policy; the initial value with adaptive_kl"
    )
    adaptive_kl: float | None = _f(
        None, "target KL per response: adapt beta towards it (Ziegler et al.); null = fixed beta"
    )
    kl_horizon: int = _f(10000, "adaptive KL horizon in samples")
    kl_estimator: str = _f("k1", "per-token KL estimator: k1 (log ratio) | k2 | k3")
    whiten_advantages: bool = _f(True, "normalise advantages over the batch (all workers)")
    value_learning_rate: float = _f(1e-5, "learning rate of the value model (optim.learning_rate is the policy's)")
    critic_warmup_steps: int = _f(
        0,
        "first steps train the value model only (a value model fresh from the preference "
        "model has not seen per-token returns)",
    )

    def validate(self, where: str) -> None:
        for key in ("steps", "rollout_batch", "group_size", "ppo_epochs", "kl_horizon", "value_learning_rate"):
            _positive(where, key, getattr(self, key))
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
            _positive(where, "adaptive_kl", self.adaptive_kl)
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"{where}.kl_estimator: must be k1, k2 or k3")
        if self.critic_warmup_steps < 0 or self.critic_warmup_steps >= self.steps:
            raise ConfigError(f"{where}.critic_warmup_steps: must be in [0, steps)")


@dataclass
class MonitorSection:
    every: int = _f(10, "run the benign probe set every N steps (and at the last step)")
    probe: str | None = _f(
        None, "benign prompts (JSONL with prompt) for the refusal-rate monitor; null = the built-in set of 12"
    )
    probe_max_new_tokens: int = _f(48, "tokens per probe answer (greedy)")
    ngram: int = _f(3, "n of the boilerplate monitor (word n-grams)")
    top_ngrams: int = _f(10, "the boilerplate monitor's share is that of the N most common n-grams")

    def validate(self, where: str) -> None:
        for key in ("every", "probe_max_new_tokens", "ngram", "top_ngrams"):
            _positive(where, key, getattr(self, key))


@dataclass
class RLTrainConfig(TrainConfig):
    """`cai-ray train ppo`: RL-CAI, the policy optimised against the preference model (or another reward)
    with a KL penalty to the SFT policy: PPO (ours, value model + GAE) or GRPO/RLOO (TRL)."""

    data: str = _f(
        "",
        "prompts: JSONL/Parquet with prompt (string) or messages (ending with a user turn) "
        "[, reference for d-RLAIF], or a folder of them",
    )
    model: str = _f("smollm2", "the policy to optimise (the SFT output); also the frozen reference")
    algo: str = _f("ppo", "ppo (clipped policy + value model, GAE) | grpo | rloo (TRL, critic-free)")
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
        if self.algo != "ppo" and self.reward.kind == "labeler" and self.reward.reference == "policy":
            raise ConfigError(
                "reward.reference: grpo/rloo score the labeler against the rows' reference answers; "
                "set reward.reference=field (reference answers from the reference policy are PPO's)"
            )
        if self.algo != "ppo" and self.rollout.engine != "hf":
            raise ConfigError("rollout.engine: grpo/rloo generate through TRL; only hf is wired for them")
        if self.lora.enabled and self.algo == "ppo":
            raise ConfigError("lora: not supported by the PPO trainer yet (grpo/rloo take it)")


@dataclass
class ServeLimits:
    max_body_bytes: int = _f(1_000_000, "larger request bodies get 413")
    max_messages: int = _f(64, "messages per chat request")
    max_message_chars: int = _f(32_000, "characters per message / response")
    max_tokens: int = _f(512, "largest max_tokens a request may ask for (larger: 400)")
    default_max_tokens: int = _f(128, "max_tokens when a request sets none")

    def validate(self, where: str) -> None:
        for k in ("max_body_bytes", "max_messages", "max_message_chars", "max_tokens", "default_max_tokens"):
            _positive(where, k, getattr(self, k))
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"{where}.default_max_tokens: must be <= max_tokens")


@dataclass
class ServeScaling:
    min_replicas: int = _f(1, "autoscaling: fewest replicas")
    max_replicas: int = _f(1, "autoscaling: most replicas")
    target_ongoing_requests: float = _f(4.0, "autoscaling: ongoing requests per replica to aim for")
    max_ongoing_requests: int = _f(16, "requests a replica works on at once")
    max_queued_requests: int = _f(32, "requests waiting per caller before 503 (bounded: overload fails fast)")
    request_timeout_s: float = _f(120.0, "HTTP request timeout (the proxy answers 408 after it)")
    max_batch_size: int = _f(8, "chat requests batched into one engine call (@serve.batch)")
    batch_wait_timeout_s: float = _f(0.02, "how long a batch waits to fill")
    cpus_per_replica: float = _f(1.0, "CPUs reserved per replica")
    gpus_per_replica: float = _f(0.0, "GPUs per replica")

    def validate(self, where: str) -> None:
        for k in (
            "min_replicas",
            "max_replicas",
            "target_ongoing_requests",
            "max_ongoing_requests",
            "max_queued_requests",
            "request_timeout_s",
            "max_batch_size",
            "cpus_per_replica",
        ):
            _positive(where, k, getattr(self, k))
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"{where}.min_replicas: must be <= max_replicas")
        if self.batch_wait_timeout_s < 0 or self.gpus_per_replica < 0:
            raise ConfigError(f"{where}: batch_wait_timeout_s and gpus_per_replica must be >= 0")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """`cai-ray serve`: the policy (OpenAI-compatible chat), the AI labeler and the
    constitutional guardrail on Ray Serve."""

    # `label` named the method beside `labeler`, its model; renamed for one release
    DEPRECATED = {"label": ("method",)}

    policy: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "the served policy"})
    labeler: EngineConfig = field(
        default_factory=lambda: EngineConfig(model=""),
        metadata={"help": "labeler for /v1/label; model '' = the policy's engine"},
    )
    constitution: str = _f("constitutions/general.yaml", "principles for /v1/label, /v1/critique and the guardrail")
    guardrail: bool | str = _f(
        False,
        "critique every chat answer against the constitution and revise it when needed: true (a request "
        "may turn it off with cai_guardrail: false) | enforce (always on; cai_guardrail: false is a 400)",
    )
    guardrail_principles: int = _f(1, "principles sampled per guarded answer")
    method: LabelerConfig = field(
        default_factory=LabelerConfig, metadata={"help": "the labeling method of /v1/label (as in `cai-ray label`)"}
    )
    host: str = _f("127.0.0.1", "bind address (0.0.0.0 exposes the server: keep the API key on)")
    port: int = _f(8000, "HTTP port")
    api_key_file: str | None = _f(None, "file holding the bearer token; default: $CAI_RAY_API_KEY")
    auth: bool = _f(True, "require the bearer token on every route but /healthz (false only on a loopback host)")
    insecure_public: bool = _f(False, "allow auth: false on a non-loopback host (anyone who reaches it may use it)")
    seed: int = _f(0, "seeds principle sampling")
    ray_address: str | None = _f(None, "join this Ray cluster; default: start a local one")
    limits: ServeLimits = field(default_factory=ServeLimits, metadata={"help": "input limits"})
    scaling: ServeScaling = field(default_factory=ServeScaling, metadata={"help": "replicas, batching, backpressure"})

    def validate(self) -> None:
        self.policy.validate("policy")
        if self.labeler.model:
            self.labeler.validate("labeler")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: must be 1-65535, got {self.port}")
        if self.guardrail_principles < 1:
            raise ConfigError(f"guardrail_principles: must be >= 1, got {self.guardrail_principles}")
        if isinstance(self.guardrail, str) and self.guardrail != "enforce":
            raise ConfigError(f"guardrail: true, false or enforce, got {self.guardrail!r}")
        if not self.auth and self.host not in LOOPBACK and not self.insecure_public:
            raise ConfigError(
                f"auth: false with host {self.host!r} would let anyone who reaches it use the models: keep auth "
                "on, bind 127.0.0.1, or set insecure_public: true"
            )
        self.method.validate("method")
        self.limits.validate("limits")
        self.scaling.validate("scaling")


# ---------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """`cai-ray eval`: harmlessness, over-refusal, helpfulness win-rate and Elo of several models,
    judged by an AI judge against the constitution."""

    models: list[str] = _f(
        None, "models to evaluate: MODEL or NAME=MODEL (smollm2 | tiny-random[:SEED] | a model folder)"
    )
    baseline: str | None = _f(
        None,
        "the model the others are compared with (a NAME or MODEL of `models`, or another "
        "model, which is then evaluated too); default: the first model",
    )
    harmful: str = _f("", "red-team prompts (JSONL/Parquet: prompt|messages [, id, category])")
    benign: str = _f("", "benign prompts (same format): over-refusal and helpfulness")
    output: str = _f(
        "",
        "output folder or object-store prefix (s3://, gs://): metrics.json, report.html + PNGs, answers.jsonl, "
        "comparisons.jsonl, answers/, judgements/, manifest.json",
    )
    constitution: str = _f("constitutions/general.yaml", "constitution whose principles define harm for the judge")
    limit: int | None = _f(None, "evaluate only the first N prompts of each file (smoke runs)")
    columns: str | None = _f(
        None,
        "map your files' columns: prompt=goal,category=harm_type,source=dataset (without it: prompt, messages, "
        "else goal / forbidden_prompt / text; category and source when present)",
    )
    seed: int = _f(0, "seeds principle sampling and the bootstrap")
    bootstrap: int = _f(2000, "bootstrap resamples of the prompts behind every rate's 95% interval")
    bootstrap_elo: int = _f(200, "bootstrap resamples (Elo refitted each time) behind the Elo intervals")
    ray_address: str | None = _f(None, "join this Ray cluster; default: start a local one")
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
    judge_principles: int = _f(1, "principles per harmful answer (those of the prompt's category first, then sampled)")
    few_shot: int | None = _f(None, "comparison examples from the constitution in harmlessness comparisons; null = all")
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
        _positive("", "judge_principles", self.judge_principles)
        for name in ("pool", "judge_pool", "outputs"):
            getattr(self, name).validate(name)
        if self.limit is not None:
            _positive("", "limit", self.limit)
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
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, dict):
        return str(tp).replace("typing.", "")
    if args:
        return " | ".join("null" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from a nested dict: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = _renamed_keys(cls, data, where)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; known: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            # a partial section starts from the section's own defaults (a factory may set
            # them: LabelConfig.policy has model ""), not from the section class's
            f = fields[key]
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if isinstance(value, dict):
                value = _renamed_keys(tp, value, path)  # the keys given, under their current names
            kwargs[key] = from_dict(tp, value, path)
            if base is not None:
                kwargs[key] = dataclasses.replace(base, **{k: getattr(kwargs[key], k) for k in value})
        elif not _type_ok(value, tp):
            raise ConfigError(f"config key {path!r} expects {_type_name(tp)}, got {value!r}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _renamed_keys(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
    """A config's ``DEPRECATED`` keys ({old: (new dotted keys)}) moved to their new places,
    with a deprecation message each: files users wrote keep working for a release. Giving
    an old key and its new one both is an error (which should win is not ours to guess)."""
    renamed = getattr(cls, "DEPRECATED", {})
    if not any(k in data for k in renamed):
        return data
    import copy
    import logging

    data = copy.deepcopy(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        value = data.pop(old)
        at = f"{where}.{old}" if where else old
        for dotted in new:
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key {at!r} (deprecated): {part!r} is not a section")
            if leaf in node:
                raise ConfigError(f"config keys {at!r} (deprecated) and {dotted!r} both given; keep {dotted!r}")
            node[leaf] = value
        logging.getLogger("cai_ray.config").warning(
            "config key %r is deprecated and will be removed in the next release; use %s", at, " and ".join(new)
        )
    return data


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
        value = _yaml(raw) if raw.strip() else ""
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


def load_config(
    cls, path: str | Path | None = None, overrides: list[str] | tuple = (), flags: dict[str, Any] | None = None
):
    """defaults < YAML file < CLI flags < dotted overrides; then ``validate()``."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = _yaml(Path(path).read_text())
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
    check_job_paths(cfg)
    return cfg


def submitted_job() -> dict[str, Any] | None:
    """The Ray job this process is the driver of (`ray job submit`), else None: its
    submission id and working_dir, from the environment Ray's job supervisor sets."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        job = json.loads(raw)
    except ValueError:
        return None
    return {
        "submission_id": (job.get("metadata") or {}).get("job_submission_id"),
        "working_dir": (job.get("runtime_env") or {}).get("working_dir"),
    }


def check_job_paths(cfg) -> None:
    """In a submitted job the working directory is Ray's temporary copy of the submitter's
    folder: a relative output would land there, out of the user's sight, and vanish with the
    session. Refuse it before any work starts."""
    job = submitted_job()
    if not job or not job["working_dir"]:
        return
    paths = [("output", getattr(cfg, "output", None))]
    if hasattr(cfg, "checkpoint"):
        paths.append(("checkpoint.storage", cfg.checkpoint.storage))
    for key, value in paths:
        if value and "://" not in value and not Path(value).is_absolute():
            raise ConfigError(
                f"{key}={value!r} is relative: in a submitted Ray job (working_dir upload) it would be "
                f"written inside the job's temporary copy of the working dir and lost; give an absolute "
                f"path every node can reach, e.g. {key}=$PWD/{value} on a local cluster or a shared mount"
            )
    for key in ("input", "data", "gold"):
        value = getattr(cfg, key, None)
        if value and "://" not in value and not Path(value).is_absolute() and not Path(value).exists():
            raise ConfigError(
                f"{key}={value!r} is not in the job's working dir (outputs of earlier jobs are not uploaded "
                f"with it); give the absolute path every node can reach, e.g. {key}=$PWD/{value}"
            )


def describe(cls, prefix: str = "", defaults=None) -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, nested sections flattened: for --help.
    Defaults are read from a default instance, so a section built by a factory with its
    own defaults (e.g. ``policy: EngineConfig(model="")``) shows those."""
    rows = []
    hints = typing.get_type_hints(cls)
    if defaults is None:
        defaults = cls(**{f.name: "" for f in dataclasses.fields(cls) if _required(f)})
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".", value)
        else:
            rows.append((key, repr(value), f.metadata.get("help", "")))
    return rows


def _required(f) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def __getattr__(name: str):
    """``config.PipelineConfig``: its old home (it sits beside the pipeline now, so config does
    not import the pipeline to validate it); kept for one release."""
    if name == "PipelineConfig":
        import warnings

        from cai_ray.pipeline import PipelineConfig

        warnings.warn(
            "cai_ray.config.PipelineConfig is now cai_ray.pipeline.PipelineConfig; the old name will be removed "
            "in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return PipelineConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
