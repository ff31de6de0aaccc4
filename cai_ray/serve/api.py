"""The HTTP surface: OpenAI-compatible chat, /v1/label, /v1/critique, /healthz.

Every route but /healthz needs ``Authorization: Bearer <key>`` (compared in constant time
against the key's SHA-256; the key itself is never stored or logged), checked by the
outermost middleware before a byte of the body is read; the same middleware counts the body
as it arrives (``Content-Length`` or chunked) and answers 413 past ``limits.max_body_bytes``.
Bad input is a 4xx with an OpenAI-style error body naming the problem, never a 500: schema
errors, too many or too long messages, ``max_tokens`` above the server's limit, prompts
(the guardrail's critique and revision prompts included) longer than the model's context,
unknown or repeated principles, seeds out of range; an engine failing on one request fails
that request only. A pair too long for the labeler is a 200 with ``invalid`` saying which
comparison and how long (as the label step marks it). The engine itself failing (out of
memory, dead) is a 503 with Retry-After: the request was fine, a retry may succeed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cai_ray.core.context import context_overflow
from cai_ray.engine import Sampling
from cai_ray.serve.config import ServeConfig
from cai_ray.serve.service import RETRY_AFTER_S, EngineDown, RequestError

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


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_ok(header: str, key_sha256: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key_digest(token.strip()), key_sha256)


UNAUTHORISED = "missing or wrong API key (Authorization: Bearer <key>)"
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

        async def finish_reason(text: str) -> tuple[int, str]:
            done = (
                msgs[:-1] + [{"role": "assistant", "content": msgs[-1]["content"] + text}]
                if req.continue_final_message
                else msgs + [{"role": "assistant", "content": text}]
            )
            [total] = await service.count_tokens([done])
            completion_tokens = max(total - prompt_tokens, 0)
            return completion_tokens, "length" if completion_tokens >= max_tokens else "stop"

        if req.stream and not guard and service.streams:
            # tokens as the engine makes them (vLLM); the guardrail needs the whole answer first
            async def live():
                yield _chunk(cid, created, service.policy_name, {"role": "assistant", "content": ""})
                pieces = []
                async for piece in service.stream(msgs, sampling):
                    pieces.append(piece)
                    yield _chunk(cid, created, service.policy_name, {"content": piece})
                _, finish = await finish_reason("".join(pieces).strip())
                yield _chunk(cid, created, service.policy_name, {}, finish, cai_guardrail=None)
                yield "data: [DONE]\n\n"

            return StreamingResponse(live(), media_type="text/event-stream")
        out = await service.chat(msgs, sampling, guard, key=key)
        text = out["text"]
        completion_tokens, finish = await finish_reason(text)
        if req.stream:
            return StreamingResponse(
                _sse(cid, created, service.policy_name, text, finish, out["guardrail"]), media_type="text/event-stream"
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
            "cai_guardrail": out["guardrail"],
        }

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


async def _sse(cid: str, created: int, model: str, text: str, finish: str, guardrail):
    """A finished answer as OpenAI streaming chunks (hf engines, guardrail answers): the
    role, the text in pieces, the finish reason, [DONE]."""
    yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
    pieces = text.split(" ")
    for i, piece in enumerate(pieces):
        yield _chunk(cid, created, model, {"content": piece if i == 0 else " " + piece})
    yield _chunk(cid, created, model, {}, finish, cai_guardrail=guardrail)
    yield "data: [DONE]\n\n"
