"""The config sections several steps share: an engine, its sampling, an actor pool, the input
and output settings of a batch stage, and the RLAIF labeling method (label, serve, RL's labeler
reward, eval's judge)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cai_ray.config.loader import ConfigError, positive, setting


# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineConfig:
    backend: str = setting(
        "hf",
        "engine backend: hf (transformers, CPU/GPU) | vllm (vLLM's async engine; GPU, or its CPU build) | openai (an OpenAI-compatible "
        "endpoint, e.g. vLLM or cai-ray serve) | noop (benchmarks only)",
    )
    model: str = setting(
        "smollm2",
        "smollm2 | tiny-random[:SEED] | a local HF model folder | a hub id (org/name); openai: the served model id",
    )
    dtype: str = setting("bfloat16", "float32 | bfloat16 | float16 | auto (bfloat16 is ~2x float32 on this CPU)")
    threads: int | None = setting(None, "torch threads per engine actor on CPU; default: node CPUs / max actors")
    max_batch_size: int = setting(32, "hf: conversations per forward pass (micro-batch)")
    prefix_cache: bool = setting(
        True,
        "prefill the tokens prompts share (few-shot turns) once and reuse the KV cache "
        "(hf: per micro-batch; vllm: its automatic prefix caching)",
    )
    enforce_eager: bool = setting(
        True,
        "vllm: eager mode; false = torch.compile / CUDA graphs (slower start-up, measured ~15% more tokens/s on CPU)",
    )
    kv_cache_gb: float | None = setting(
        None, "vllm on CPU: KV cache GiB per engine (default 1); on GPUs gpu_memory_utilization sizes it"
    )
    max_num_seqs: int | None = setting(
        None, "vllm: requests the engine runs at once (its batch); null = vLLM's default"
    )
    tensor_parallel_size: int = setting(1, "vllm: GPUs per engine actor")
    gpu_memory_utilization: float = setting(0.9, "vllm: share of GPU memory for weights + KV cache")
    max_model_len: int | None = setting(
        None, "vllm: context length override; openai: the context when the endpoint does not report it"
    )
    base_url: str | None = setting(None, "openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = setting(
        "OPENAI_API_KEY", "openai: environment variable holding the API key (cai-ray serve: CAI_RAY_API_KEY)"
    )
    concurrency: int = setting(8, "openai: requests in flight per engine actor")
    request_timeout_s: float = setting(300.0, "openai: seconds per request before it is retried")

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
            positive(where, "concurrency", self.concurrency)
            positive(where, "request_timeout_s", self.request_timeout_s)
        elif self.base_url is not None:
            raise ConfigError(f"{where}.base_url: only backend openai uses it (backend is {self.backend!r})")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ConfigError(f"{where}.dtype: must be float32, bfloat16, float16 or auto")
        positive(where, "max_batch_size", self.max_batch_size)
        positive(where, "tensor_parallel_size", self.tensor_parallel_size)
        if self.threads is not None:
            positive(where, "threads", self.threads)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization: must be in (0, 1]")
        if self.kv_cache_gb is not None and self.kv_cache_gb < 1:
            raise ConfigError(f"{where}.kv_cache_gb: must be >= 1 (whole GiB) or null")
        if self.max_num_seqs is not None:
            positive(where, "max_num_seqs", self.max_num_seqs)

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


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = setting(0.7, "0 = greedy")
    top_p: float = setting(0.95, "nucleus sampling mass")
    max_new_tokens: int = setting(256, "tokens per generated answer, critique and revision")
    min_new_tokens: int = setting(0, "force at least this many tokens (benchmarks: equal token budgets)")

    def validate(self, where: str) -> None:
        if self.temperature < 0:
            raise ConfigError(f"{where}.temperature: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p: must be in (0, 1]")
        positive(where, "max_new_tokens", self.max_new_tokens)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"{where}.min_new_tokens: must be in [0, max_new_tokens]")


@dataclass(frozen=True)
class PoolConfig:
    min_actors: int = setting(1, "engine actors at least (Ray Data autoscales between min and max)")
    max_actors: int = setting(1, "engine actors at most")
    cpus_per_actor: float = setting(1.0, "CPUs reserved per engine actor; fractional so a small node never deadlocks")
    gpus_per_actor: float = setting(0.0, "GPUs per engine actor (vllm: = tensor_parallel_size)")
    batch_size: int = setting(
        16, "rows per engine actor task (the unit of work, of retry after a crash, and of actor load balancing)"
    )
    task_cpus: float = setting(0.25, "CPUs reserved per read / validate / write task")
    object_store_gb: float | None = setting(
        None,
        "cap on object-store memory this job's data in flight may use (Ray Data resource limit); null = Ray's default share",
    )

    def validate(self, where: str) -> None:
        positive(where, "min_actors", self.min_actors)
        positive(where, "batch_size", self.batch_size)
        if self.max_actors < self.min_actors:
            raise ConfigError(f"{where}.max_actors: must be >= min_actors ({self.min_actors})")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ConfigError(f"{where}: cpus_per_actor and gpus_per_actor must be >= 0")
        if not 0 < self.task_cpus <= 64:
            raise ConfigError(f"{where}.task_cpus: must be in (0, 64]")
        if self.object_store_gb is not None and self.object_store_gb <= 0:
            raise ConfigError(f"{where}.object_store_gb: must be > 0 or null")


@dataclass(frozen=True)
class InputConfig:
    max_prompt_chars: int = setting(32000, "longer prompts are rejected before tokenization")

    def validate(self, where: str) -> None:
        positive(where, "max_prompt_chars", self.max_prompt_chars)


@dataclass(frozen=True)
class OutputConfig:
    rows_per_file: int = setting(256, "rows per Parquet part; smaller = finer-grained resume, more files")

    def validate(self, where: str) -> None:
        positive(where, "rows_per_file", self.rows_per_file)


@dataclass(frozen=True)
class LabelerConfig:
    principles_per_pair: int = setting(
        1, "principles sampled (seeded, distinct) per pair; their probabilities are averaged (ensemble)"
    )
    both_orders: bool = setting(True, "label every pair as (A,B) and (B,A) and average: position debiasing (RLAIF)")
    few_shot: int | None = setting(None, "comparison examples from the constitution; null = all")
    cot: bool = setting(False, "chain of thought: the labeler reasons first, then the choice is scored and clamped")
    clamp_low: float = setting(0.4, "CoT only: lower clamp of each probability (CAI paper: 0.4)")
    clamp_high: float = setting(0.6, "CoT only: upper clamp (CAI paper: 0.6)")
    cot_max_new_tokens: int = setting(192, "CoT only: token budget of the reasoning")
    cot_temperature: float = setting(0.0, "CoT only: sampling temperature of the reasoning (0 = greedy)")

    def validate(self, where: str) -> None:
        positive(where, "principles_per_pair", self.principles_per_pair)
        positive(where, "cot_max_new_tokens", self.cot_max_new_tokens)
        if self.few_shot is not None and self.few_shot < 0:
            raise ConfigError(f"{where}.few_shot: must be >= 0 or null")
        if not 0 <= self.clamp_low <= 0.5 <= self.clamp_high <= 1:
            raise ConfigError(
                f"{where}.clamp_low/clamp_high: need 0 <= low <= 0.5 <= high <= 1, "
                f"got ({self.clamp_low}, {self.clamp_high})"
            )
        if self.cot_temperature < 0:
            raise ConfigError(f"{where}.cot_temperature: must be >= 0")
