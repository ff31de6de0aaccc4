"""What the server does, without HTTP or Ray: chat (with the optional constitutional
guardrail), labels and critiques, on the same engines and the same label math as the batch
stages. The Ray Serve deployment subclasses it to batch chat calls; tests use it directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from typing import Any

from cai_ray.core import prompts
from cai_ray.core.constitution import load_constitution
from cai_ray.core.labeler import Labeler, LabelSettings
from cai_ray.engine import Sampling, engine_from_section
from cai_ray.serve.config import ServeConfig


class RequestError(ValueError):
    """This one request cannot be answered (the client's to fix): a 400 for it alone."""


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
            need = max(counts[2 * i] + draft + max_tokens, counts[2 * i + 1] + draft + 2 * max_tokens)
            if need > ctx:
                raise RequestError(
                    f"the critique and revision prompts for principle {p.id!r} (the constitution's few-shot "
                    f"examples + this conversation + max_tokens {max_tokens} per step) need {need} tokens; "
                    f"the model's context is {ctx}: send a shorter conversation or a smaller max_tokens"
                )

    def guard_principles(self, key: str) -> list:
        return self.constitution.sample_distinct(key, self.settings.guardrail_principles, self.settings.seed)

    # -- chat ---------------------------------------------------------------------------------
    async def generate(self, messages: list[dict], sampling: Sampling) -> str:
        """One answer; for hf engines the deployment batches these (@serve.batch)."""
        try:
            if self.async_engine:
                return await self.policy.on_engine(self.policy.agenerate(messages, sampling))
            [text] = await self._run(self.policy.generate, [messages], sampling)
        except (RequestError, asyncio.CancelledError):
            raise
        except Exception as e:  # the engine's reason, for this request only
            raise RequestError(f"the engine could not answer this request: {type(e).__name__}: {e}") from e
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
        principles = [self.constitution.principle(p) for p in principle_ids] if principle_ids else None
        pair_id = pair_key(messages, response_a, response_b)
        [lab] = await self._run(
            self.labeler.label, [pair_id], [messages], [response_a], [response_b], [principles] if principles else None
        )
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
        }


async def answer_batch(generate, items: list[tuple[list[dict], Sampling]]) -> list[str | RequestError]:
    """Answers for a batch of (conversation, sampling) requests, in request order: one engine
    call (``await generate(convs, sampling)``) per distinct sampling setting. When a call
    fails, its requests are retried one at a time, so only the culprit gets an error (a
    RequestError in its place) and the others their answers."""
    out: list[str | RequestError | None] = [None] * len(items)
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
                    text = RequestError(f"the engine could not answer this request: {type(e).__name__}: {e}")
                texts.append(text)
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def pair_key(messages: list[dict], a: str, b: str) -> str:
    """A stable id for a pair, so principle sampling is the same on every call."""
    return hashlib.sha256(json.dumps([messages, a, b], sort_keys=True).encode()).hexdigest()[:16]
