"""``backend: openai``: any OpenAI-compatible endpoint as the engine of the batch stages,
so a big model served elsewhere (vLLM, a hosted API, or ``cai-ray serve``) can answer,
critique, revise and label.

    generate         POST {base_url}/chat/completions, ``concurrency`` requests in flight; a
                     conversation ending with an assistant message is continued (vLLM's
                     ``continue_final_message``), each conversation gets its own seed
    token_counts     POST {root}/tokenize (vLLM and cai-ray servers: exact); an endpoint
                     without it gets an estimate (characters / 3 + 8 per message), said in
                     the log and in ``token_counts_exact``
    choice_logprobs  the first token's ``top_logprobs``; a choice not among them is
                     ``Unscored`` (the labeler marks that comparison invalid, with the reason);
                     an endpoint that returns no logprobs is an error that says so
    label_pairs      only when the endpoint is a cai-ray server (GET {base_url}/cai answers):
                     the Labeler sends whole pairs to /v1/label, the batch labeler's own code
                     on the server side, after checking that both label by the same method

The API key is read from the environment variable named by ``api_key_env``, never from the
config, so it never reaches a manifest or a log. Transient failures (connection, 429, 5xx)
are retried by the ``openai`` client with backoff (``max_retries``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cai_ray.engine import EngineUnavailable, Message, Sampling, Unscored, normalise_logprobs

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_ESTIMATE = 3  # English BPE averages ~4; 3 over-counts, so long prompts err toward rejection


RETRY_STATUS = (408, 429, 500, 502, 503, 504)
# Probing for an optional route: servers answer an unknown one with 404, 405, 400 or 422.
PROBE_ABSENT = tuple(c for c in range(400, 500) if c not in (401, 403, *RETRY_STATUS))


def _backoff(attempt: int, retry_after: str | None) -> float:
    """Seconds before retry ``attempt``: the server's Retry-After when it gives one, else
    0.5, 1, 2, ... (capped at 8) with jitter."""
    if retry_after and retry_after.replace(".", "", 1).isdigit():
        return min(float(retry_after), 60.0)
    return min(0.5 * 2**attempt, 8.0) * (0.75 + 0.5 * random.random())


class EngineError(RuntimeError):
    """The endpoint refused a request (the message is the endpoint's)."""


class OpenAIEngine:
    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_model_len: int | None = None,
        concurrency: int = 8,
        request_timeout_s: float = 300.0,
        max_retries: int = 3,
        top_logprobs: int = 20,
        transport=None,  # an httpx transport (tests: an endpoint in-process)
        api_key_ref=None,  # a Ray object holding the key (engine actors: stage.actor_engine_kwargs)
    ):
        try:
            import httpx
            import openai
        except ImportError as e:  # pragma: no cover - both are dependencies
            raise EngineUnavailable("engine backend 'openai' needs the openai package: pip install openai") from e
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        if api_key_ref is not None:
            import ray

            key = ray.get(api_key_ref).strip()
        else:
            key = os.environ.get(api_key_env, "").strip()
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=key or "none",
            timeout=request_timeout_s,
            max_retries=max_retries,
            http_client=httpx.Client(transport=transport),
        )
        self.http = httpx.Client(
            timeout=request_timeout_s, transport=transport, headers={"Authorization": f"Bearer {key}"} if key else {}
        )
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-engine")
        self.model = model
        self.model_name = f"{model}@{self.base_url}"
        self.top_logprobs = top_logprobs
        self.max_retries = max_retries
        self.tokens_generated = 0

        try:
            served = {m.id: m for m in self.client.models.list()}
        except openai.AuthenticationError:
            raise EngineUnavailable(
                f"{self.base_url} refused the API key (401): put the key in ${api_key_env}"
            ) from None
        except openai.APIConnectionError as e:
            raise EngineUnavailable(f"cannot reach {self.base_url}: {e}") from None
        if model not in served:
            raise EngineUnavailable(f"{self.base_url} does not serve {model!r}; it serves {sorted(served)}")
        reported = (served[model].model_extra or {}).get("max_model_len")
        self.context_length = int(max_model_len or reported or 0)
        if not self.context_length:
            raise EngineUnavailable(
                f"{self.base_url} does not report the context length of {model!r}: set engine.max_model_len"
            )

        info = self._get(f"{self.base_url}/cai", absent=PROBE_ABSENT)
        self.is_cai_ray = bool(info and info.get("server") == "cai-ray")
        # Only a cai-ray server labels whole pairs; the Labeler looks for this attribute.
        self.label_pairs = self._label_pairs if self.is_cai_ray else None
        self.label_method = info["label_method"] if self.is_cai_ray else None
        probe = self._tokenize_body([{"role": "user", "content": "hi"}])
        self.token_counts_exact = self._post(f"{self.root}/tokenize", probe, absent=PROBE_ABSENT) is not None
        if not self.token_counts_exact:
            log.warning(
                "%s has no /tokenize: prompt lengths are estimated as characters/%d (+8 per message)",
                self.base_url,
                CHARS_PER_TOKEN_ESTIMATE,
            )

    # -- HTTP helpers --------------------------------------------------------------------------
    def _get(self, url: str, absent=(404, 405)) -> dict | None:
        return self._request("GET", url, None, absent)

    def _post(self, url: str, body: dict, absent=(404, 405)) -> dict | None:
        return self._request("POST", url, body, absent)

    def _request(self, method: str, url: str, body: dict | None, absent) -> dict | None:
        """JSON of a request (None: a status in ``absent``, the endpoint has no such route).
        Like the openai client: overload (408, 429, 5xx) and connection errors are retried
        with exponential backoff."""
        import httpx

        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                r = self.http.request(method, url, json=body)
            except httpx.TransportError as e:
                if last:
                    raise EngineError(f"{method} {url}: {e}") from None
                time.sleep(_backoff(attempt, None))
                continue
            if r.status_code in RETRY_STATUS and not last:
                time.sleep(_backoff(attempt, r.headers.get("retry-after")))
                continue
            if r.status_code in absent:
                return None
            if r.status_code != 200:
                raise EngineError(f"{method} {url}: {r.status_code} {_message(r)}")
            return r.json()
        raise AssertionError("unreachable")

    def _map(self, fn, items: list) -> list:
        return list(self.pool.map(fn, items))

    def _tokenize_body(self, conv: list[Message]) -> dict:
        cont = conv[-1]["role"] == "assistant"
        return {
            "model": self.model,
            "messages": list(conv),
            "add_generation_prompt": not cont,
            "continue_final_message": cont,
        }

    def _extra(self, conv: list[Message]) -> dict[str, Any]:
        """vLLM's chat extensions for continuing a prefilled assistant message."""
        if conv[-1]["role"] != "assistant":
            return {}
        extra: dict[str, Any] = {"continue_final_message": True, "add_generation_prompt": False}
        if self.is_cai_ray:
            extra["cai_guardrail"] = False  # a continuation is not a whole answer to revise
        return extra

    def _chat(self, conv: list[Message], **kw):
        try:
            return self.client.chat.completions.create(model=self.model, messages=list(conv), **kw)
        except self._openai.BadRequestError as e:
            raise EngineError(f"{self.base_url} refused a request: {_api_message(e)}") from None

    # -- Engine -------------------------------------------------------------------------------
    def token_counts(self, convs: list[list[Message]]) -> list[int]:
        if not self.token_counts_exact:
            return [sum(len(m["content"]) // CHARS_PER_TOKEN_ESTIMATE + 8 for m in c) for c in convs]
        return self._map(lambda c: int(self._post(f"{self.root}/tokenize", self._tokenize_body(c))["count"]), convs)

    def generate(self, convs: list[list[Message]], params: Sampling) -> list[str]:
        def one(item):
            i, conv = item
            extra = self._extra(conv)
            if params.min_new_tokens:
                extra["min_tokens"] = params.min_new_tokens
            kw: dict[str, Any] = {
                "max_tokens": params.max_new_tokens,
                "temperature": 0.0 if params.greedy else params.temperature,
                "top_p": 1.0 if params.greedy else params.top_p,
            }
            if params.seed is not None:
                # one seed per conversation: k samples of one prompt in a batch must differ
                kw["seed"] = (params.seed * 1_000_003 + i) % 2**31
            r = self._chat(conv, extra_body=extra or None, **kw)
            if r.usage is not None:
                self.tokens_generated += r.usage.completion_tokens
            return (r.choices[0].message.content or "").strip()

        return self._map(one, list(enumerate(convs)))

    def choice_logprobs(self, convs: list[list[Message]], choices: Sequence[str]) -> list[list[float] | Unscored]:
        if self.is_cai_ray:
            raise EngineUnavailable(
                f"{self.base_url} is a cai-ray server: it labels pairs through /v1/label "
                "(the Labeler does that) and returns no token logprobs"
            )

        def one(conv):
            try:
                r = self._chat(
                    conv,
                    max_tokens=1,
                    temperature=0.0,
                    logprobs=True,
                    top_logprobs=self.top_logprobs,
                    extra_body=self._extra(conv) or None,
                )
            except EngineError as e:
                if "logprob" in str(e).lower():
                    raise EngineUnavailable(self._no_logprobs(str(e))) from None
                raise
            lp = r.choices[0].logprobs
            if lp is None or not lp.content:
                raise EngineUnavailable(self._no_logprobs("the response had no logprobs"))
            top = lp.content[0].top_logprobs or []
            row = []
            for c in choices:
                hits = [t.logprob for t in top if t.token.strip() == c]
                if not hits:
                    shown = ", ".join(repr(t.token) for t in top[:5])
                    return Unscored(
                        f"choice {c!r} is not among the endpoint's top {len(top)} first tokens ({shown}, ...)"
                    )
                m = max(hits)
                row.append(m + math.log(sum(math.exp(h - m) for h in hits)))
            return normalise_logprobs(row)

        return self._map(one, convs)

    def _no_logprobs(self, why: str) -> str:
        return (
            f"{self.base_url} cannot score label choices: {why}. Label with an endpoint that returns token "
            "logprobs (vLLM, OpenAI chat models) or a cai-ray server (/v1/label)"
        )

    # -- cai-ray server ---------------------------------------------------------------------------
    def _label_pairs(
        self, convs: list, resp_a: list[str], resp_b: list[str], principle_ids: list[list[str]]
    ) -> list[dict]:
        def one(item):
            conv, a, b, ids = item
            return self._post(
                f"{self.base_url}/label",
                {"messages": list(conv), "response_a": a, "response_b": b, "principle_ids": ids},
            )

        return self._map(one, list(zip(convs, resp_a, resp_b, principle_ids)))


def _message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except Exception:  # noqa: BLE001 - any non-OpenAI error body
        return r.text[:300]


def _api_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error", {}).get("message") or body)
    return str(e)
