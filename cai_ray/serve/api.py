"""The HTTP surface: OpenAI-compatible chat, /v1/label, /v1/critique, the reward routes
(/v1/reward, OpenRLHF's /v1/reward/openrlhf, vLLM's /classify), /healthz.

Every route but /healthz needs ``Authorization: Bearer <key>`` — or HTTP Basic with the key as
the password, which is what clients that only take a URL send for ``http://user:KEY@host/...``
(OpenRLHF's aiohttp, requests) — compared in constant time against the key's SHA-256 (the
key itself is never stored or logged), checked by the outermost middleware before a byte of
the body is read; the same middleware counts the body as it arrives (``Content-Length`` or
chunked) and answers 413 past ``limits.max_body_bytes``. Bad input is a 4xx with an
OpenAI-style error body naming the problem, never a 500: schema errors, too many or too long
messages, ``max_tokens`` above the server's limit, prompts (the guardrail's critique and
revision prompts included) longer than the model's context, unknown or repeated principles,
seeds out of range; an engine failing on one request fails that request only. A pair too
long for the labeler is a 200 with ``invalid`` saying which comparison and how long (as the
label step marks it). The engine itself failing (out of memory, dead) is a 503 with
Retry-After: the request was fine, a retry may succeed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import uuid
from contextlib import contextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cai_ray.core.context import context_overflow
from cai_ray.core.label_math import sigmoid
from cai_ray.engine import Sampling
from cai_ray.serve.config import ServeConfig
from cai_ray.serve.guard import GuardFailure, Verdict
from cai_ray.serve.reward import RewardItem
from cai_ray.serve.service import RETRY_AFTER_S, EngineDown, RequestError
from cai_ray.serve.service import engine_down as engine_is_down

MAX_SEED = 2**63 - 1  # torch.manual_seed and vLLM take 64-bit seeds


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    min_tokens: int = Field(0, ge=0, description="vLLM extension: no end of answer before this many tokens")
    continue_final_message: bool = Field(False, description="vLLM extension: continue the last (assistant) message")
    add_generation_prompt: bool = Field(True, description="vLLM extension: false with continue_final_message")
    logprobs: bool = Field(False, description="not offered: label scoring is /v1/label")
    cai_guardrail: bool | None = Field(None, description="critique and revise the answer (default: the server's)")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize, the chat form."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)


class LabelRequest(BaseModel):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    response_a: str = Field(min_length=1)
    response_b: str = Field(min_length=1)
    principle_ids: list[str] | None = Field(None, min_length=1)


class CritiqueRequest(BaseModel):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    response: str = Field(min_length=1)
    principle_id: str
    max_tokens: int | None = Field(None, ge=1)


class RewardRequestItem(BaseModel):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    response: str
    reference: str | None = Field(None, description="labeler scorer: the answer to beat (default: the policy's)")


Scorer = Literal["model", "labeler"]


class RewardRequest(BaseModel):
    """POST /v1/reward: ours (what cai_ray.reward_client sends)."""

    items: list[RewardRequestItem] = Field(min_length=1)
    scorer: Scorer | None = None


class OpenRLHFRewardRequest(BaseModel):
    """What OpenRLHF's SingleTurnAgentExecutor._fetch_rewards_via_http posts to
    ``--reward.remote_url``: ``query`` = prompt + response (decoded with special tokens),
    ``prompts`` = the prompt strings, ``labels`` = the dataset's ``--data.label_key`` ("" without one)."""

    model_config = ConfigDict(extra="ignore")
    query: list[str]
    prompts: list[str] | None = None
    labels: list[str | None] | None = None


class ClassifyRequest(BaseModel):
    """vLLM's /classify, text form: what verl's reward loop posts for a discriminative reward
    model (``{"model", "input", "activation": false}``); ``use_activation`` is vLLM's newer name."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str]
    activation: bool | None = None
    use_activation: bool | None = None
    add_special_tokens: bool = True


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_ok(header: str, key_sha256: str) -> bool:
    """``Bearer KEY``, or ``Basic base64(user:KEY)`` (any user name): the form an HTTP client
    sends for a URL with credentials in it, for trainers that take a reward URL and nothing else."""
    scheme, _, token = header.partition(" ")
    scheme, token = scheme.lower(), token.strip()
    if scheme == "basic":
        try:
            token = base64.b64decode(token, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme != "bearer":
        return False
    return hmac.compare_digest(key_digest(token), key_sha256)


UNAUTHORISED = "missing or wrong API key (Authorization: Bearer <key>, or Basic with the key as password)"
OPEN_PATHS = frozenset({"/healthz"})


class RequestGuard:
    """Outermost (pure ASGI) middleware: the key first — a request without it never has its
    body read — then the body, counted as it arrives whatever its framing (Content-Length
    or chunked), refused with 413 once over ``max_bytes``; the app gets the body replayed."""

    def __init__(self, app, key_sha256: str | None, max_bytes: int):
        self.app, self.key_sha256, self.max_bytes = app, key_sha256, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (
            self.key_sha256 is not None
            and scope["path"] not in OPEN_PATHS
            and not key_ok(headers.get("authorization", ""), self.key_sha256)
        ):
            return await _reply(send, 401, UNAUTHORISED, "authentication_error", [(b"www-authenticate", b"Bearer")])
        too_big = f"request body over {self.max_bytes} bytes"
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_bytes):
            return await _reply(send, 413, too_big)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await _reply(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # a streaming response listens for the disconnect

        await self.app(scope, replay, send)


async def _reply(send, status: int, message: str, kind: str = "invalid_request_error", headers=()) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def build_app(service, settings: ServeConfig, key_sha256: str | None) -> FastAPI:
    """The FastAPI app over ``service`` (a ``Service``). ``key_sha256`` None = no auth
    (only when ``auth: false``)."""
    limits = settings.limits
    app = FastAPI(title="cai-ray", docs_url=None, redoc_url=None)

    app.add_middleware(RequestGuard, key_sha256=key_sha256, max_bytes=limits.max_body_bytes)

    def authorised(request: Request) -> None:
        """Declares the scheme in the OpenAPI schema; RequestGuard has checked it already."""
        if key_sha256 is not None and not key_ok(request.headers.get("authorization", ""), key_sha256):
            raise HTTPException(401, UNAUTHORISED, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        resp = error(
            exc.status_code,
            str(exc.detail),
            "authentication_error" if exc.status_code == 401 else "invalid_request_error",
        )
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error(400, str(exc))

    @app.exception_handler(EngineDown)
    async def engine_down(request: Request, exc: EngineDown):
        """The engine failed, not the request (Service.failure decides): retry later."""
        resp = error(503, str(exc), "server_error")
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        return resp

    @app.exception_handler(GuardFailure)
    async def guard_failed(request: Request, exc: GuardFailure):
        """A classifier raised on this request: not answered (the guard fails closed). Out of
        memory: 503, retry; anything else: 500 with the reason. Other requests go on."""
        if exc.__cause__ is not None and engine_is_down(exc.__cause__):
            resp = error(503, f"{exc}; retry in {RETRY_AFTER_S} s", "server_error")
            resp.headers["Retry-After"] = str(RETRY_AFTER_S)
            return resp
        return error(500, str(exc), "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error(400, problems or "invalid request")

    def conversation(prompt: str | None, messages: list[ChatMessage] | None) -> list[dict]:
        if (prompt is None) == (messages is None):
            raise HTTPException(400, "give exactly one of 'prompt' or 'messages'")
        msgs = [{"role": "user", "content": prompt}] if prompt is not None else [m.model_dump() for m in messages]
        check_messages(msgs)
        return msgs

    def check_messages(msgs: list[dict], continue_final: bool = False) -> None:
        check_sizes(msgs)
        if not any(m["content"].strip() for m in msgs if m["role"] == "user"):
            raise HTTPException(400, "the conversation needs a non-empty user message")
        if (msgs[-1]["role"] == "assistant") != continue_final:
            raise HTTPException(
                400,
                "continue_final_message needs the last message to be the assistant's"
                if continue_final
                else "the last message must not be from the assistant (or set continue_final_message)",
            )

    def check_sizes(msgs: list[dict]) -> None:
        if len(msgs) > limits.max_messages:
            raise HTTPException(400, f"{len(msgs)} messages; this server takes at most {limits.max_messages}")
        for i, m in enumerate(msgs):
            if len(m["content"]) > limits.max_message_chars:
                raise HTTPException(
                    400, f"messages[{i}] has {len(m['content'])} characters; the limit is {limits.max_message_chars}"
                )

    def check_text(name: str, text: str) -> None:
        if not text.strip():
            raise HTTPException(400, f"'{name}' is empty")
        if len(text) > limits.max_message_chars:
            raise HTTPException(400, f"'{name}' has {len(text)} characters; the limit is {limits.max_message_chars}")

    def budget(requested: int | None) -> int:
        n = requested or limits.default_max_tokens
        if n > limits.max_tokens:
            raise HTTPException(400, f"max_tokens {n} is over this server's limit of {limits.max_tokens}")
        return n

    async def check_context(msgs: list[dict], max_tokens: int) -> int:
        [n] = await service.count_tokens([msgs])
        why = context_overflow("the model", n, max_tokens, service.policy.context_length)
        if why:
            raise HTTPException(400, why)
        return n

    def principle_ids(ids: list[str]) -> None:
        known = {p.id for p in service.constitution.principles}
        if len(ids) > len(known):
            raise HTTPException(400, f"{len(ids)} principle ids; this constitution has {len(known)} principles")
        unknown = [p for p in ids if p not in known]
        if unknown:
            raise HTTPException(400, f"unknown principle ids {unknown[:10]}; this constitution has {sorted(known)}")
        repeated = sorted({p for p in ids if ids.count(p) > 1})
        if repeated:
            raise HTTPException(400, f"principle ids repeated: {repeated}; give each at most once")

    # -- rewards (serve/reward.py; docs/serving.md "Reward service for OpenRLHF, verl and TRL") --
    def scorer_of(asked: str | None) -> str:
        scorer = asked or settings.reward.default_scorer
        if scorer == "model" and service.rewards.model is None:
            raise HTTPException(
                400, "this server has no preference model (start it with reward.model=FOLDER); the labeler scores"
            )
        return scorer

    def item_count(n: int) -> None:
        if n > settings.reward.max_items:
            raise HTTPException(
                400, f"{n} items; this server scores at most {settings.reward.max_items} per request (reward.max_items)"
            )

    def check_length(name: str, text: str) -> None:
        """A response may be empty (a policy can answer nothing; it is scored), not too long."""
        if len(text) > limits.max_message_chars:
            raise HTTPException(400, f"'{name}' has {len(text)} characters; the limit is {limits.max_message_chars}")

    @contextmanager
    def item(where: str):
        """A 400 about one item names it."""
        try:
            yield
        except HTTPException as e:
            raise HTTPException(e.status_code, f"{where}: {e.detail}") from e

    async def rewards_of(items: list[RewardItem], scorer: str) -> tuple[list[float], list[str | None]]:
        if scorer == "model":
            scores, _ = await service.rewards.by_model([service.rewards.model_text(it) for it in items])
            return scores, [None] * len(items)
        return await service.rewards.by_labeler(items)

    @app.post("/v1/reward", dependencies=[Depends(authorised)])
    async def reward(req: RewardRequest):
        """Items (prompt or messages, response[, reference]) → one score each."""
        item_count(len(req.items))
        scorer = scorer_of(req.scorer)
        items = []
        for i, it in enumerate(req.items):
            with item(f"items[{i}]"):
                msgs = conversation(it.prompt, it.messages)
                check_length("response", it.response)
                check_length("reference", it.reference or "")
            items.append(RewardItem(msgs, it.response, it.reference or None))
        scores, invalid = await rewards_of(items, scorer)
        return {"scores": scores, "invalid": invalid, "scorer": scorer, "scored_by": service.rewards.scored_by(scorer)}

    @app.post("/v1/reward/openrlhf", dependencies=[Depends(authorised)])
    async def openrlhf_reward(req: OpenRLHFRewardRequest, scorer: Scorer | None = None):
        """OpenRLHF's body in, the keys OpenRLHF reads out: ``rewards`` (the advantage's),
        ``scores`` (dynamic filtering; the same numbers, as OpenRLHF's own serve_rm sends) and
        ``extra_logs`` (one number per item each, logged). ``?scorer=`` picks the scorer."""
        n = len(req.query)
        item_count(n)
        for name, values in (("prompts", req.prompts), ("labels", req.labels)):
            if values is not None and len(values) != n:
                raise HTTPException(400, f"'{name}' has {len(values)} items and 'query' {n}: give one per query")
        scorer = scorer_of(scorer)
        if not n:  # OpenRLHF shards a batch over its reward URLs: one query and two URLs send one empty
            return {"rewards": [], "scores": [], "extra_logs": {"cai_unscored": []}}
        if scorer == "model":
            # the query is already prompt + response in the policy's chat template: scored as
            # sent, as OpenRLHF's own reward server does
            scores, _ = await service.rewards.by_model(req.query)
            invalid = [None] * n
        else:
            if req.prompts is None:
                raise HTTPException(400, "the labeler needs 'prompts' to tell each query's prompt from its response")
            items = []
            for i, (query, prompt) in enumerate(zip(req.query, req.prompts)):
                if not query.startswith(prompt):
                    raise HTTPException(400, f"query[{i}] does not start with prompts[{i}]: cannot find the response")
                label = req.labels[i] if req.labels is not None else None
                it = service.rewards.openrlhf_item(prompt, query[len(prompt) :], label)
                with item(f"query[{i}]"):
                    check_messages(it.messages)
                    check_length("response", it.response)
                    check_length("label", it.reference or "")
                items.append(it)
            scores, invalid = await service.rewards.by_labeler(items)
        return {
            "rewards": scores,
            "scores": scores,
            "extra_logs": {"cai_unscored": [float(x is not None) for x in invalid]},
        }

    @app.post("/classify", dependencies=[Depends(authorised)])
    async def classify(req: ClassifyRequest):
        """vLLM's classification response over the preference model: ``data[i].probs[0]`` is
        σ(r) (vLLM's default activation), or r itself with ``activation: false`` (what verl
        sends, reading ``data[-1]["probs"][-1]``). ``model`` is not checked: verl sends its own path."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise HTTPException(400, "'input' is empty")
        item_count(len(texts))
        scorer_of("model")
        scores, counts = await service.rewards.by_model(texts, add_special_tokens=req.add_special_tokens)
        activation = next((a for a in (req.use_activation, req.activation) if a is not None), True)
        tokens = sum(counts)
        return {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": service.rewards.model.name,
            "data": [
                {
                    "index": i,
                    "label": service.rewards.model.label,
                    "probs": [sigmoid(s) if activation else s],
                    "num_classes": 1,
                }
                for i, s in enumerate(scores)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    @app.get("/healthz")
    async def healthz():
        """Liveness only, and open: says nothing about the models (the engine's own health
        is Serve's check_health, which replaces a replica whose engine died)."""
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models():
        names = dict.fromkeys([service.policy_name, service.labeler_name])
        ctx = {
            service.policy_name: service.policy.context_length,
            service.labeler_name: service.labeler_engine.context_length,
        }
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "cai-ray", "max_model_len": ctx[n]}
                for n in names
            ],
        }

    @app.get("/v1/cai", dependencies=[Depends(authorised)])
    async def info():
        """This server's identity and labeling method (for ``backend: openai`` clients)."""
        return service.info()

    @app.post("/tokenize", dependencies=[Depends(authorised)])
    async def tokenize(req: TokenizeRequest):
        """Prompt tokens after the policy's chat template (vLLM's route, count only)."""
        msgs = [m.model_dump() for m in req.messages]
        check_sizes(msgs)
        [n] = await service.count_tokens([msgs])
        return {"count": n, "max_model_len": service.policy.context_length}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat(req: ChatRequest):
        msgs = [m.model_dump() for m in req.messages]
        if req.logprobs:
            raise HTTPException(400, "this server does not return token logprobs; label scoring is POST /v1/label")
        if req.continue_final_message and req.add_generation_prompt:
            raise HTTPException(400, "continue_final_message needs add_generation_prompt: false")
        check_messages(msgs, req.continue_final_message)
        max_tokens = budget(req.max_completion_tokens or req.max_tokens)
        if req.min_tokens > max_tokens:
            raise HTTPException(400, f"min_tokens {req.min_tokens} is over max_tokens {max_tokens}")
        prompt_tokens = await check_context(msgs, max_tokens)
        enforced = settings.guardrail == "enforce"
        if enforced and req.cai_guardrail is False:
            raise HTTPException(400, "this server enforces its guardrail: cai_guardrail cannot be false")
        guard = bool(settings.guardrail) if req.cai_guardrail is None else req.cai_guardrail
        if guard and req.continue_final_message:
            raise HTTPException(
                400,
                "the guardrail revises whole answers, not continued messages"
                + ("" if enforced else ": set cai_guardrail: false with continue_final_message"),
            )
        key = uuid.uuid4().hex
        if guard:
            await service.check_critique_room(msgs, None, service.guard_principles(key), max_tokens)
        sampling = Sampling(
            temperature=req.temperature,
            top_p=req.top_p,
            max_new_tokens=max_tokens,
            min_new_tokens=req.min_tokens,
            seed=settings.seed if req.seed is None else req.seed,
        )
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        gate = service.guard  # guard: classifier (serve/guard.py); None without
        # what the output classifier reads: the conversation and the answer, which continues
        # the last (assistant) message with continue_final_message
        conv, head = (msgs[:-1], msgs[-1]["content"]) if req.continue_final_message else (msgs, "")

        async def finish_reason(text: str) -> tuple[int, str]:
            done = (
                msgs[:-1] + [{"role": "assistant", "content": msgs[-1]["content"] + text}]
                if req.continue_final_message
                else msgs + [{"role": "assistant", "content": text}]
            )
            [total] = await service.count_tokens([done])
            completion_tokens = max(total - prompt_tokens, 0)
            return completion_tokens, "length" if completion_tokens >= max_tokens else "stop"

        async def reply(text: str, guardrail, verdict: Verdict | None = None):
            """The answer, whole or streamed. A guard refusal is the constitution's refusal
            with finish_reason content_filter; streamed, it comes after the clean prefix a live
            stream had released when the answer was cut (``verdict.clean_text``), so hf and
            vLLM streams show the same."""
            refused = verdict is not None and verdict.refused
            completion_tokens, finish = await finish_reason(text)
            finish = "content_filter" if refused else finish
            guard_field = verdict.body() if verdict is not None else None
            if req.stream:
                shown, tail = (verdict.clean_text, _after_cut(verdict.clean_text, text)) if refused else (text, None)
                return StreamingResponse(
                    _sse(cid, created, service.policy_name, shown, finish, guardrail, tail, guard_field),
                    media_type="text/event-stream",
                )
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": service.policy_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "cai_guardrail": guardrail,
                "cai_guard": guard_field,
            }

        first = None
        if gate is not None:  # the prompt, before anything is generated
            try:
                first = await gate.check_input(msgs)
            except GuardFailure as e:
                gate.record_failure(cid, "input", e, stream=req.stream)
                raise
            if first.refused:
                gate.record(cid, first, stream=req.stream)
                return await reply(gate.refusal, None, first)

        if req.stream and not guard and service.streams:
            # tokens as the engine makes them (vLLM); the guardrail needs the whole answer first.
            # With the classifier guard, text goes out once a check covering it has passed.
            async def live():
                yield _chunk(cid, created, service.policy_name, {"role": "assistant", "content": ""})
                pieces, verdict = [], None
                stream = service.stream(msgs, sampling)
                if gate is not None:
                    stream = gate.screen(conv, stream, first, head)
                try:
                    async for piece in stream:
                        if isinstance(piece, Verdict):
                            verdict = piece
                        else:
                            pieces.append(piece)
                            yield _chunk(cid, created, service.policy_name, {"content": piece})
                except GuardFailure as e:  # the status line is sent: an error event ends this stream
                    gate.record_failure(cid, "output", e, stream=req.stream)
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'code': 500}})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if verdict is not None:
                    gate.record(cid, verdict, stream=True)
                if verdict is not None and verdict.refused:
                    yield _chunk(
                        cid, created, service.policy_name, {"content": _after_cut(verdict.clean_text, gate.refusal)}
                    )
                    finish = "content_filter"
                else:
                    _, finish = await finish_reason("".join(pieces).strip())
                guard_field = verdict.body() if verdict is not None else None
                yield _chunk(cid, created, service.policy_name, {}, finish, cai_guardrail=None, cai_guard=guard_field)
                yield "data: [DONE]\n\n"

            return StreamingResponse(live(), media_type="text/event-stream")
        out = await service.chat(msgs, sampling, guard, key=key)
        if gate is None:
            return await reply(out["text"], out["guardrail"])
        # a whole answer (hf, the guardrail's revision): checked at the prefixes a stream would be
        try:
            verdict = await gate.check_answer(conv, out["text"], first, head)
        except GuardFailure as e:
            gate.record_failure(cid, "output", e, stream=req.stream)
            raise
        gate.record(cid, verdict, stream=req.stream)
        return await reply(gate.refusal if verdict.refused else out["text"], out["guardrail"], verdict)

    @app.post("/v1/label", dependencies=[Depends(authorised)])
    async def label(req: LabelRequest):
        msgs = conversation(req.prompt, req.messages)
        check_text("response_a", req.response_a)
        check_text("response_b", req.response_b)
        if req.principle_ids:
            principle_ids(req.principle_ids)
        return await service.label(msgs, req.response_a, req.response_b, req.principle_ids)

    @app.post("/v1/critique", dependencies=[Depends(authorised)])
    async def critique(req: CritiqueRequest):
        msgs = conversation(req.prompt, req.messages)
        check_text("response", req.response)
        principle_ids([req.principle_id])
        max_tokens = budget(req.max_tokens)
        await service.check_critique_room(
            msgs, req.response, [service.constitution.principle(req.principle_id)], max_tokens
        )
        sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_tokens, seed=settings.seed)
        return await service.critique(msgs, req.response, req.principle_id, sampling)

    return app


def _chunk(cid: str, created: int, model: str, delta: dict, reason: str | None = None, **extra) -> str:
    """One OpenAI streaming chunk (server-sent event)."""
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


async def _sse(
    cid: str, created: int, model: str, text: str, finish: str, guardrail, tail: str | None = None, guard=None
):
    """A finished answer as OpenAI streaming chunks (hf engines, guardrail answers): the
    role, the text in pieces, ``tail`` (the guard's refusal after a cut), the finish reason
    with ``cai_guardrail`` and ``cai_guard``, [DONE]."""
    yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
    pieces = text.split(" ") if text else []
    for i, piece in enumerate(pieces):
        yield _chunk(cid, created, model, {"content": piece if i == 0 else " " + piece})
    if tail:
        yield _chunk(cid, created, model, {"content": tail})
    yield _chunk(cid, created, model, {}, finish, cai_guardrail=guardrail, cai_guard=guard)
    yield "data: [DONE]\n\n"


def _after_cut(released: str, refusal: str) -> str:
    """What a stream sends after the guard cut its answer: the refusal, on its own paragraph
    when part of the answer had already gone out."""
    return f"\n\n{refusal}" if released.strip() else refusal


def read_api_key(api_key_file: str | None, off: str) -> str:
    """The key from ``api_key_file`` or $CAI_RAY_API_KEY, at least 16 characters; ``off``: how
    the caller turns auth off, named in the error (serve and the review page share this)."""
    import os
    from pathlib import Path

    if api_key_file:
        key, where = Path(api_key_file).read_text().strip(), api_key_file
    else:
        key, where = os.environ.get("CAI_RAY_API_KEY", "").strip(), "$CAI_RAY_API_KEY"
    if not key:
        raise ValueError(f"no API key in {where}: set CAI_RAY_API_KEY or --api-key-file (or {off})")
    if len(key) < 16:
        raise ValueError(f"the API key in {where} is shorter than 16 characters")
    return key
