"""What the server does, without HTTP or Ray: chat (with the optional constitutional
guardrail), labels, critiques and rewards (``serve/reward.py``), on the same engines and the
same label math as the batch stages. The Ray Serve deployment subclasses it to batch chat
calls; tests use it directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from typing import Any

from cai_ray.core import prompts
from cai_ray.core.constitution import load_constitution
from cai_ray.core.context import context_overflow
from cai_ray.core.labeler import Labeler, LabelSettings, PairLabel
from cai_ray.engine import Sampling, engine_from_section
from cai_ray.serve.config import ServeConfig


class RequestError(ValueError):
    """This one request cannot be answered (the client's to fix): a 400 for it alone."""


RETRY_AFTER_S = 10  # a 503's Retry-After: memory frees as requests finish; Serve replaces a dead replica
HEALTH_CHECK_TIMEOUT_S = 10
# Failures of the engine itself, whatever the request: matched by class name (anywhere in
# the exception's MRO) so neither torch nor vLLM is imported to recognise them.
ENGINE_DOWN_TYPES = frozenset({"OutOfMemoryError", "MemoryError", "EngineDeadError"})
ENGINE_DOWN_MESSAGES = ("out of memory", "can't allocate memory")


class EngineDown(RuntimeError):
    """The engine cannot answer any request now (out of memory, its process died): a 503
    with Retry-After, not a 400 — the request was fine and a retry may succeed."""


def engine_down(e: BaseException) -> bool:
    """Whether ``e`` is the engine failing rather than the request: out of memory
    (torch.OutOfMemoryError, "CUDA out of memory", MemoryError) or a dead vLLM engine
    (EngineDeadError)."""
    if isinstance(e, EngineDown) or {c.__name__ for c in type(e).__mro__} & ENGINE_DOWN_TYPES:
        return True
    return any(m in str(e).lower() for m in ENGINE_DOWN_MESSAGES)


class Service:
    def __init__(self, settings: ServeConfig):
        """``settings``: the app's frozen ServeConfig (what travels to every replica)."""
        self.settings = settings
        pol = settings.policy
        self.policy = engine_from_section(pol)
        lab = settings.labeler
        same = not lab.model or (lab.model, lab.backend) == (pol.model, pol.backend)
        self.labeler_engine = self.policy if same else engine_from_section(lab)
        self.policy_name = pol.model
        self.labeler_name = pol.model if same else lab.model
        self.constitution = load_constitution(settings.constitution)
        self.labeler = Labeler(self.labeler_engine, self.constitution, LabelSettings.of(settings.method, settings.seed))
        self.shots = prompts.few_shot_turns(self.constitution, None)
        # hf engines are not thread-safe: one call at a time. An async engine (vLLM) takes
        # every request as it comes and batches them itself (continuous batching).
        self.async_engine = all(getattr(e, "supports_async", False) for e in (self.policy, self.labeler_engine))
        self._lock = threading.Lock()
        # Requests are counted (context check, usage) without waiting for the engine: were
        # counting behind the engine lock, requests would reach the batcher one generation
        # apart and batches would fragment (measured: batches of 1-5 instead of 16).
        make_counter = getattr(self.policy, "counter", None)
        self._counter = make_counter() if make_counter else None
        self._count_lock = threading.Lock()
        from cai_ray.serve.reward import Rewards  # (it builds on this module's errors)

        self.rewards = Rewards(self, settings.reward)
        self.guard = None  # guard: classifier (serve/guard.py): the constitutional classifiers
        if settings.guard == "classifier":
            from cai_ray.serve.guard import load_guard

            # "every N tokens" counts the policy's tokens, on a tokenizer copy of the guard's own
            # (None, an engine without one: the output classifier's tokenizer counts)
            tokenizer = getattr(make_counter(), "tokenizer", None) if make_counter else None
            self.guard = load_guard(settings.classifier, self.constitution, tokenizer)

    async def _run(self, fn, *args):
        if self.async_engine:
            return await asyncio.to_thread(fn, *args)

        def call():
            with self._lock:
                return fn(*args)

        return await asyncio.to_thread(call)

    async def count_tokens(self, convs: list[list[dict]]) -> list[int]:
        """Prompt tokens of each conversation after the policy's chat template."""
        if self._counter is None:
            return await self._run(self.policy.token_counts, convs)

        def call():
            with self._count_lock:
                return self._counter.token_counts(convs)

        return await asyncio.to_thread(call)

    def check_health(self) -> None:
        """Raises when an engine cannot answer (Serve's health check: the replica is replaced)."""
        for engine in {id(e): e for e in (self.policy, self.labeler_engine)}.values():
            check = getattr(engine, "check_health", None)
            if check is not None:
                check()

    async def failure(self, e: Exception) -> RequestError | EngineDown:
        """What a request is told when the engine raised ``e`` on it — the one place engine
        errors become statuses: EngineDown (503, retry) when the engine itself failed (out of
        memory, dead, or its health check fails now), else RequestError (400, this request
        alone: the batch it was in has been retried without it)."""
        if isinstance(e, RequestError | EngineDown):
            return e
        down = engine_down(e)
        if not down:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.check_health), HEALTH_CHECK_TIMEOUT_S)
            except Exception as health:  # noqa: BLE001 - a failing or hanging health check: the engine is down
                e, down = health, True
        if down:
            return EngineDown(
                f"the engine cannot answer any request right now ({type(e).__name__}: {e}); retry in {RETRY_AFTER_S} s"
            )
        return RequestError(f"the engine could not answer this request: {type(e).__name__}: {e}")

    async def check_critique_room(
        self, messages: list[dict], response: str | None, principles: list, max_tokens: int
    ) -> None:
        """RequestError unless every critique and revision prompt the engine will see fits the
        policy's context: the few-shot critique prompt + the answer + the critique, and the
        revision prompt + the answer + the critique + the revision. ``response`` None = the
        guardrail's own draft, not known yet: counted as max_tokens tokens."""
        convs = []
        for p in principles:
            convs += [
                prompts.critique_messages(self.shots, messages, response or "", p),
                prompts.revision_messages(self.shots, messages, response or "", p, ""),
            ]
        counts = await self.count_tokens(convs)
        draft = max_tokens if response is None else 0
        ctx = self.policy.context_length
        for i, p in enumerate(principles):
            # generated into each prompt: the draft (if not given), then the critique, then the revision
            for step, n, budget in (
                ("critique", counts[2 * i], draft + max_tokens),
                ("revision", counts[2 * i + 1], draft + 2 * max_tokens),
            ):
                who = f"the model (the {step} prompt for principle {p.id!r}: few-shot examples + this conversation)"
                why = context_overflow(who, n, budget, ctx)
                if why:
                    raise RequestError(why)

    def guard_principles(self, key: str) -> list:
        return self.constitution.sample_distinct(key, self.settings.guardrail_principles, self.settings.seed)

    # -- chat ---------------------------------------------------------------------------------
    async def generate(self, messages: list[dict], sampling: Sampling) -> str:
        """One answer; for hf engines the deployment batches these (@serve.batch)."""
        try:
            if self.async_engine:
                return await self.policy.on_engine(self.policy.agenerate(messages, sampling))
            [text] = await self._run(self.policy.generate, [messages], sampling)
        except Exception as e:
            raise await self.failure(e) from e
        return text

    @property
    def streams(self) -> bool:
        """Whether the policy streams tokens as they are generated (vLLM)."""
        return hasattr(self.policy, "stream")

    def stream(self, messages: list[dict], sampling: Sampling):
        """Text pieces of one answer as the engine makes them (an async generator)."""
        return self.policy.stream(messages, sampling)

    async def chat(self, messages: list[dict], sampling: Sampling, guardrail: bool, key: str) -> dict[str, Any]:
        """The answer, and with the guardrail the critique/revision trace."""
        draft = await self.generate(messages, sampling)
        if not guardrail:
            return {"text": draft, "guardrail": None}
        steps = []
        text = draft
        for p in self.guard_principles(key):
            step = await self.critique(messages, text, p.id, sampling)
            steps.append(step)
            if step["revised"]:
                text = step["revision"]
        return {"text": text, "guardrail": {"draft": draft, "revised": text != draft, "steps": steps}}

    # -- critique -----------------------------------------------------------------------------
    async def critique(
        self, messages: list[dict], response: str, principle_id: str, sampling: Sampling
    ) -> dict[str, Any]:
        """The paper's critique then revision against one principle. ``revised`` says whether
        the revision differs from the response."""
        p = self.constitution.principle(principle_id)
        critique = await self.generate(prompts.critique_messages(self.shots, messages, response, p), sampling)
        revision = await self.generate(prompts.revision_messages(self.shots, messages, response, p, critique), sampling)
        revision = revision.strip() or response
        return {"principle": p.id, "critique": critique, "revision": revision, "revised": revision != response}

    # -- labels -------------------------------------------------------------------------------
    async def label(
        self, messages: list[dict], response_a: str, response_b: str, principle_ids: list[str] | None
    ) -> dict[str, Any]:
        """The pair's label; a pair with a comparison longer than the labeler's context is
        not scored: ``invalid`` says which comparison and by how much (as the label step marks
        such a row), and the answer is still a 200, so a client labelling many pairs (the
        ``openai`` engine's ``label_pairs``) keeps the others' labels."""
        principles = [self.constitution.principle(p) for p in principle_ids] if principle_ids else None
        pair_id = pair_key(messages, response_a, response_b)
        too_long = await self.label_overflow(pair_id, messages, response_a, response_b, principles)
        if too_long:
            pids = [p.id for p in self.labeler.principles_for(pair_id, principles)]
            lab = PairLabel(None, None, None, None, pids, None, None, None, too_long)
        else:
            try:
                [lab] = await self._run(
                    self.labeler.label,
                    [pair_id],
                    [messages],
                    [response_a],
                    [response_b],
                    [principles] if principles else None,
                )
            except Exception as e:
                raise await self.failure(e) from e
        return {
            "p_a": lab.p_a,
            "p_ab": lab.p_ab,
            "p_ba": lab.p_ba,
            "position_consistent": lab.position_consistent,
            "principle_ids": lab.principle_ids,
            "p_ab_by_principle": lab.p_ab_by_principle,
            "p_ba_by_principle": lab.p_ba_by_principle,
            "reasoning": lab.reasoning,
            "invalid": lab.invalid,
            "labeler": self.labeler_name,
            "template_sha256": self.labeler.template_sha256,
        }

    async def label_overflow(self, pair_id: str, messages, response_a: str, response_b: str, principles) -> str | None:
        """Why the first of the pair's comparisons (principle x order, the few-shot prompt the
        labeler scores) that does not fit the labeler's context does not, or None: counted
        exactly, with the labeler's generation budget."""
        comps = self.labeler.comparisons_for(pair_id, messages, response_a, response_b, principles)
        convs = [m for _, _, m in comps]
        if self.labeler_engine is self.policy:
            counts = await self.count_tokens(convs)
        else:
            counts = await self._run(self.labeler_engine.token_counts, convs)
        ctx = self.labeler_engine.context_length
        for (p, order, _), n in zip(comps, counts):
            why = context_overflow(f"the labeler (principle {p.id!r}, order {order})", n, self.labeler.budget, ctx)
            if why:
                return why
        return None

    def info(self) -> dict[str, Any]:
        """What a client needs to use this server as an engine (``backend: openai``)."""
        from cai_ray import __version__

        return {
            "server": "cai-ray",
            "version": __version__,
            "policy": self.policy_name,
            "labeler": self.labeler_name,
            "context_length": self.policy.context_length,
            "principles": [p.id for p in self.constitution.principles],
            "label_method": self.labeler.method(),
            "reward": {
                "scorer": self.settings.reward.default_scorer,
                "model": self.rewards.model.name if self.rewards.model else None,
            },
        }


async def answer_batch(generate, items: list[tuple[list[dict], Sampling]]) -> list[str | Exception]:
    """Answers for a batch of (conversation, sampling) requests, in request order: one engine
    call (``await generate(convs, sampling)``) per distinct sampling setting. When a call
    fails, its requests are retried one at a time, so only the culprit gets an error (the
    exception it raised alone, in its place; ``Service.failure`` says what it means) and the
    others their answers."""
    out: list[str | Exception | None] = [None] * len(items)
    groups: dict[Sampling, list[int]] = {}
    for i, (_, s) in enumerate(items):
        groups.setdefault(s, []).append(i)
    for s, idx in groups.items():
        try:
            texts = await generate([items[i][0] for i in idx], s)
        except Exception:
            texts = []
            for i in idx:
                try:
                    [text] = await generate([items[i][0]], s)
                except Exception as e:
                    text = e
                texts.append(text)
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def pair_key(messages: list[dict], a: str, b: str) -> str:
    """A stable id for a pair, so principle sampling is the same on every call."""
    return hashlib.sha256(json.dumps([messages, a, b], sort_keys=True).encode()).hexdigest()[:16]
