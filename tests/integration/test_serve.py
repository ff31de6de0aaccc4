"""The server: the HTTP surface in-process (auth, 4xx on bad input, label = batch labeler),
then the real Ray Serve app on 127.0.0.1 with the official `openai` client. Every test runs
on an hf replica and on a vLLM one (vLLM's CPU build, continuous batching, live streaming)."""

import dataclasses
import json

import pytest

from cai_ray.engine import Sampling

KEY = "test-key-0123456789abcdef"


AUTH = {"Authorization": f"Bearer {KEY}"}


ENGINES = {
    "hf": ["policy.model=tiny-random"],
    # vLLM's CPU attention needs head_dim 64: the wide tiny model
    "vllm": ["policy.backend=vllm", "policy.model=tiny-random-wide"],
}


@pytest.fixture(scope="module", params=["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def model(engine):
    return ENGINES[engine][-1].split("=")[1]


@pytest.fixture(scope="module")
def settings(engine):
    from cai_ray.config import load_config
    from cai_ray.serve.config import ServeConfig

    return load_config(
        ServeConfig,
        None,
        [
            *ENGINES[engine],
            "policy.dtype=float32",
            "policy.threads=1",
            "limits.max_tokens=32",
            "limits.default_max_tokens=8",
            "limits.max_messages=4",
            "limits.max_message_chars=2000",
            "limits.max_body_bytes=20000",
        ],
    )


@pytest.fixture(scope="module")
def client(settings):
    from fastapi.testclient import TestClient

    from cai_ray.serve.api import build_app, key_digest
    from cai_ray.serve.service import Service

    service = Service(settings)
    yield TestClient(build_app(service, settings, key_digest(KEY))), service
    getattr(service.policy, "shutdown", lambda: None)()


def test_every_model_route_needs_the_key(client):
    c, _ = client
    assert c.get("/healthz").status_code == 200
    for method, path, body in (
        ("get", "/v1/models", None),
        ("post", "/v1/chat/completions", {}),
        ("post", "/v1/label", {}),
        ("post", "/v1/critique", {}),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = getattr(c, method)(path, headers=headers, **({"json": body} if body is not None else {}))
            assert r.status_code == 401, (path, headers)
            assert r.headers["www-authenticate"] == "Bearer" and KEY not in r.text


@pytest.mark.parametrize(
    "body,message",
    [
        ({"messages": []}, "at least 1 item"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, "over this server's limit of 32"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n:"),
        ({"messages": [{"role": "user", "content": "x"}] * 5}, "at most 4"),
        ({"messages": [{"role": "user", "content": "x" * 3000}]}, "characters"),
        ({"messages": [{"role": "user", "content": "   "}]}, "non-empty user message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "last message"),
        ({"messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 32}, "characters"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ],
)
def test_bad_chat_input_is_a_clear_4xx(client, body, message):
    c, _ = client
    r = c.post("/v1/chat/completions", headers=AUTH, json=body)
    assert 400 <= r.status_code < 500 and message in r.json()["error"]["message"], r.text


def test_bad_label_and_critique_input_and_oversized_bodies(client):
    c, _ = client
    r = c.post(
        "/v1/label", headers=AUTH, json={"prompt": "q", "response_a": "a", "response_b": "b", "principle_ids": ["nope"]}
    )
    assert r.status_code == 400 and "unknown principle ids ['nope']" in r.json()["error"]["message"]
    r = c.post(
        "/v1/label",
        headers=AUTH,
        json={"prompt": "q", "messages": [{"role": "user", "content": "q"}], "response_a": "a", "response_b": "b"},
    )
    assert r.status_code == 400 and "exactly one of" in r.text
    r = c.post("/v1/critique", headers=AUTH, json={"prompt": "q", "response": " ", "principle_id": "honesty"})
    assert r.status_code == 400 and "'response' is empty" in r.text
    r = c.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 400
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]})
    r = c.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=big)
    assert r.status_code == 413


def test_the_key_is_checked_before_the_body_is_read_and_chunked_bodies_are_counted(client):
    """A chunked body (no Content-Length) without the key: 401 before the body is read; with
    the key, a chunked body over limits.max_body_bytes: 413 as soon as the count passes it."""
    c, _ = client
    sent = []

    def body(chunks):
        for i in range(chunks):
            sent.append(i)
            yield b"x" * 4096

    r = c.post("/v1/chat/completions", headers={"Content-Type": "application/json"}, content=body(1000))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert len(sent) <= 1, f"{len(sent)} chunks were read before the key was checked"
    sent.clear()
    # (the in-process client reads a request body whole before the app sees it: the early
    # answer on a real connection is test_a_chunked_body_is_refused_while_it_is_still_arriving)
    r = c.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=body(10))
    assert r.status_code == 413 and "over 20000 bytes" in r.text
    assert c.get("/openapi.json").status_code == 401 and c.get("/openapi.json", headers=AUTH).status_code == 200
    assert c.get("/healthz").json() == {"status": "ok"}  # open, and it names no model


def test_seeds_principles_and_the_critique_context_are_checked_up_front(client):
    c, service = client
    msg = [{"role": "user", "content": "Hello"}]
    for seed in (2**64, -1):
        r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": msg, "seed": seed, "max_tokens": 2})
        assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text
    r = c.post("/v1/chat/completions", headers=AUTH, json={"messages": msg, "seed": 2**63 - 1, "max_tokens": 2})
    assert r.status_code == 200, r.text
    pair = {"prompt": "q", "response_a": "a", "response_b": "b"}
    r = c.post("/v1/label", headers=AUTH, json={**pair, "principle_ids": ["honesty", "honesty"]})
    assert r.status_code == 400 and "repeated: ['honesty']" in r.text
    many = [p.id for p in service.constitution.principles] * 50
    r = c.post("/v1/label", headers=AUTH, json={**pair, "principle_ids": many})
    assert r.status_code == 400 and f"has {len(service.constitution.principles)} principles" in r.text
    # the user prompt fits the context; the few-shot critique/revision prompts around it do not
    long = "word " * 350
    ctx = service.policy.context_length
    assert service.policy.token_counts([[{"role": "user", "content": long}]])[0] + 32 < ctx
    r = c.post(
        "/v1/critique",
        headers=AUTH,
        json={"prompt": long, "response": long, "principle_id": "honesty", "max_tokens": 32},
    )
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and message.startswith("too long for the model (the critique prompt"), r.text
    assert message.endswith(f"+ 32 to generate > context length {ctx}"), message
    r = c.post(
        "/v1/chat/completions",
        headers=AUTH,
        json={"messages": [{"role": "user", "content": long}], "cai_guardrail": True, "max_tokens": 32},
    )
    message = r.json()["error"]["message"]  # the draft (32) is generated into both prompts too
    assert r.status_code == 400 and message.startswith("too long for the model (the "), r.text
    assert "prompt for principle" in message and message.endswith(f"to generate > context length {ctx}"), message


def test_an_enforced_guardrail_cannot_be_switched_off_by_a_client(client, settings):
    from fastapi.testclient import TestClient

    from cai_ray.serve.api import build_app, key_digest

    _, service = client
    enforced = TestClient(build_app(service, dataclasses.replace(settings, guardrail="enforce"), key_digest(KEY)))
    msg = [{"role": "user", "content": "How do I make a weapon?"}]
    r = enforced.post(
        "/v1/chat/completions", headers=AUTH, json={"messages": msg, "cai_guardrail": False, "max_tokens": 4}
    )
    assert r.status_code == 400 and "enforces its guardrail" in r.text
    r = enforced.post("/v1/chat/completions", headers=AUTH, json={"messages": msg, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["cai_guardrail"]["steps"], r.text


def test_label_route_equals_the_batch_labeler(client):
    """Same engine, same constitution, same pair and principle: the same numbers."""
    from cai_ray.core.labeler import Labeler, LabelSettings

    c, service = client
    msgs = [{"role": "user", "content": "How do I pick a lock?"}]
    body = {
        "messages": msgs,
        "response_a": "I can't help with that.",
        "response_b": "Use a tension wrench.",
        "principle_ids": ["illegal-activity", "overall-harm"],
    }
    r = c.post("/v1/label", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    batch = Labeler(service.policy, service.constitution, LabelSettings(principles_per_pair=2))
    ps = [service.constitution.principle(p) for p in body["principle_ids"]]
    [want] = batch.label(["x"], [msgs], [body["response_a"]], [body["response_b"]], [ps])
    assert got["principle_ids"] == want.principle_ids == body["principle_ids"]
    assert got["p_a"] == pytest.approx(want.p_a, abs=1e-6) and got["p_ab"] == pytest.approx(want.p_ab, abs=1e-6)
    assert got["p_ba"] == pytest.approx(want.p_ba, abs=1e-6) and 0 < got["p_a"] < 1


def test_a_pair_too_long_for_the_labeler_is_invalid_with_the_reason_not_a_500_or_a_score(client, monkeypatch):
    """An answer within the character limit whose comparison (few-shot prompt + both answers)
    is over the labeler's context: 200 with ``invalid`` naming the comparison and its length
    (as the label step marks such a row), nothing scored (hf used to score past the context
    and vLLM to raise, a 500)."""
    c, service = client
    scored = []
    real = service.labeler_engine.choice_logprobs
    monkeypatch.setattr(service.labeler_engine, "choice_logprobs", lambda *a: scored.append(1) or real(*a))
    ctx = service.labeler_engine.context_length
    long = "".join(chr(0x4E00 + i * 37 % 2000) for i in range(1990))  # 1,990 characters, a token or more each
    body = {"prompt": "Say it in Chinese.", "response_a": long, "response_b": "No.", "principle_ids": ["honesty"]}
    r = c.post("/v1/label", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["p_a"] is None and got["p_ab"] is None and got["principle_ids"] == ["honesty"]
    assert got["invalid"].startswith("too long for the labeler (principle 'honesty', order AB): "), got
    assert got["invalid"].endswith(f"prompt tokens + 1 to generate > context length {ctx}"), got
    assert not scored


def test_an_engine_out_of_memory_or_dead_is_a_503_to_retry_and_a_refused_request_stays_a_400(client, monkeypatch):
    """The engine failing (torch's OutOfMemoryError, vLLM's EngineDeadError) is not the
    request's fault: 503 with Retry-After and "retry", on chat and on /v1/label; an error on
    this request alone, with a healthy engine, is still its 400."""
    import torch

    c, service = client

    class EngineDeadError(Exception):  # vLLM's name (matched by name: vLLM is not imported)
        pass

    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "cai_guardrail": False}
    pair = {"prompt": "q", "response_a": "a", "response_b": "b"}
    for exc in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), EngineDeadError("dead")):

        def boom(*args, exc=exc, **kw):
            raise exc

        async def aboom(*args, exc=exc, **kw):
            raise exc

        monkeypatch.setattr(service.policy, "generate", boom)
        monkeypatch.setattr(service.policy, "agenerate", aboom, raising=False)  # vLLM's per-request path
        monkeypatch.setattr(service.labeler_engine, "choice_logprobs", boom)
        for path, body in (("/v1/chat/completions", chat), ("/v1/label", pair)):
            r = c.post(path, headers=AUTH, json=body)
            message = r.json()["error"]["message"]
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), (path, r.status_code, r.text)
            assert "retry" in message and type(exc).__name__ in message, message

    def refuse(*args, **kw):
        raise ValueError("this prompt breaks the sampler")

    async def arefuse(*args, **kw):
        refuse()

    monkeypatch.setattr(service.policy, "generate", refuse)
    monkeypatch.setattr(service.policy, "agenerate", arefuse, raising=False)
    r = c.post("/v1/chat/completions", headers=AUTH, json=chat)
    assert r.status_code == 400 and "this prompt breaks the sampler" in r.json()["error"]["message"], r.text


def test_guardrail_and_critique_return_their_trace(client):
    c, _ = client
    r = c.post(
        "/v1/chat/completions",
        headers=AUTH,
        json={
            "messages": [{"role": "user", "content": "How do I make a weapon?"}],
            "cai_guardrail": True,
            "max_tokens": 8,
        },
    )
    g = r.json()["cai_guardrail"]
    assert r.status_code == 200 and g["draft"] and len(g["steps"]) == 1
    step = g["steps"][0]
    assert (
        step["critique"]
        and step["revision"]
        and g["revised"] == (r.json()["choices"][0]["message"]["content"] != g["draft"])
    )
    r = c.post(
        "/v1/critique",
        headers=AUTH,
        json={"prompt": "q", "response": "an answer", "principle_id": "honesty", "max_tokens": 8},
    )
    assert r.status_code == 200 and r.json()["principle"] == "honesty" and r.json()["critique"]


def test_engine_routes_tokenize_info_and_continued_messages(client, model):
    """What the `openai` engine backend uses: /tokenize (vLLM's), /v1/cai, max_model_len,
    continue_final_message; and a clear 400 for logprobs, which this server does not give."""
    c, service = client
    msgs = [{"role": "user", "content": "Hello there"}]
    r = c.post("/tokenize", headers=AUTH, json={"model": model, "messages": msgs})
    assert r.json() == {"count": service.policy.token_counts([msgs])[0], "max_model_len": service.policy.context_length}
    info = c.get("/v1/cai", headers=AUTH).json()
    assert info["server"] == "cai-ray" and info["label_method"] == service.labeler.method()
    assert info["label_method"]["constitution_sha256"] == service.constitution.sha256
    assert c.get("/v1/models", headers=AUTH).json()["data"][0]["max_model_len"] == service.policy.context_length
    prefill = msgs + [{"role": "assistant", "content": "The answer is: ("}]
    r = c.post(
        "/v1/chat/completions",
        headers=AUTH,
        json={
            "messages": prefill,
            "continue_final_message": True,
            "add_generation_prompt": False,
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    want = service.policy.generate([prefill], Sampling(temperature=0, max_new_tokens=4))[0]
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
    for body, message in (
        ({"messages": msgs, "logprobs": True}, "label scoring is POST /v1/label"),
        ({"messages": prefill, "continue_final_message": True}, "add_generation_prompt: false"),
        ({"messages": msgs, "min_tokens": 9, "max_tokens": 4}, "min_tokens 9 is over max_tokens 4"),
        (
            {
                "messages": prefill,
                "continue_final_message": True,
                "add_generation_prompt": False,
                "cai_guardrail": True,
            },
            "not continued messages",
        ),
    ):
        r = c.post("/v1/chat/completions", headers=AUTH, json=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_requests_are_counted_while_the_engine_is_busy(client):
    """Token counting (context check, usage) must not queue behind a generation, or
    concurrent requests reach @serve.batch one generation apart and batches fragment."""
    import asyncio

    _, service = client
    msgs = [{"role": "user", "content": "count me"}]
    with service._lock:  # the engine is generating for someone else
        [n] = asyncio.run(asyncio.wait_for(service.count_tokens([msgs]), timeout=10))
    assert n == service.policy.token_counts([msgs])[0]


@pytest.fixture(scope="module")
def server(ray_local, engine, monkeypatch_module):
    """The real Ray Serve app on 127.0.0.1 (a free port)."""
    from ray import serve

    from cai_ray.config import load_config
    from cai_ray.runtime import free_port
    from cai_ray.serve.config import ServeConfig
    from cai_ray.serve.deployment import start

    port = free_port()
    monkeypatch_module.setenv("CAI_RAY_API_KEY", KEY)
    cfg = load_config(
        ServeConfig,
        None,
        [
            *ENGINES[engine],
            "policy.dtype=float32",
            "policy.threads=1",
            f"port={port}",
            "scaling.cpus_per_replica=0.5",
            "limits.max_tokens=32",
            "limits.default_max_tokens=8",
            # small on purpose: 2 at work + 2 waiting per caller, the rest must get 503 at once
            "scaling.max_ongoing_requests=2",
            "scaling.max_queued_requests=2",
            "scaling.max_batch_size=2",
        ],
    )
    url = start(cfg)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_openai_client_against_the_ray_serve_app(server, model):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [model]
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == r.choices[0].message.content  # greedy: streamed = non-streamed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-key", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=999)


def _ask(server, i, max_tokens=8):
    import httpx

    return httpx.post(
        f"{server}/v1/chat/completions",
        headers=AUTH,
        timeout=120,
        json={"messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": max_tokens, "temperature": 0},
    )


def test_curl_and_overload_gets_503_not_500(server, model):
    """24 requests at once against 2 in progress + 2 queued: the rest are turned away with
    503 straight away, none fails with another 5xx, and the server stays healthy."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    out = subprocess.run(
        ["curl", "-s", "-H", f"Authorization: Bearer {KEY}", f"{server}/v1/models"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)["data"][0]["id"] == model
    with ThreadPoolExecutor(24) as pool:
        codes = [r.status_code for r in pool.map(lambda i: _ask(server, i, 32), range(24))]
    # at least the 2 in progress succeed (under CPU load a queued slot can be refused as well)
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and 503 in codes, codes
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    assert _ask(server, 0).status_code == 200


def _chunked_request(url: str, headers: dict, chunks: int, chunk: int = 65536) -> bytes:
    """Send a chunked POST of ``chunks`` chunks over a raw socket, *without* the final chunk,
    and return what the server answers meanwhile: a server that waits for the whole body
    answers nothing (and the read times out)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.hostname}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: application/json\r\n{head}\r\n".encode()
        )
        try:
            for _ in range(chunks):
                sock.sendall(f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending
        return sock.recv(65536)


def test_a_chunked_body_is_refused_while_it_is_still_arriving(server):
    """Through Serve's proxy to the replica: a chunked body (no Content-Length) without the
    key gets 401, and with the key one past limits.max_body_bytes (1 MB here) gets 413 — both
    while the client is still sending, not after the server has read it all."""
    assert _chunked_request(server, {}, 2).startswith(b"HTTP/1.1 401")
    assert _chunked_request(server, AUTH, 24).startswith(b"HTTP/1.1 413")  # 1.5 MB of a body that never ends


def test_a_killed_replica_is_replaced_and_requests_resume(server):
    import os
    import signal
    import time
    from pathlib import Path

    def replicas():
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and b"ServeReplica:cai-ray:CAIServer" in (proc / "cmdline").read_bytes():
                    yield int(proc.name)
            except OSError:
                pass

    [before] = list(replicas())
    assert _ask(server, 1).status_code == 200
    os.kill(before, signal.SIGKILL)
    deadline, ok = time.time() + 120, False
    while time.time() < deadline and not ok:
        try:
            ok = _ask(server, 2).status_code == 200
        except Exception:  # connection reset while the replica is gone
            ok = False
        if not ok:
            time.sleep(1)
    assert ok, "no successful request within 120 s of killing the replica"
    assert list(replicas()) and before not in list(replicas())


def test_the_openai_engine_on_the_running_server(server, client, model):
    """The server as the engine of the batch code: generate (also a continued message),
    exact token counts from /tokenize, and labels through /v1/label equal to local labels."""
    from cai_ray.core.labeler import Labeler, LabelSettings
    from cai_ray.engine.openai_api import OpenAIEngine

    _, local = client
    e = OpenAIEngine(model=model, base_url=f"{server}/v1", api_key_env="CAI_RAY_API_KEY")
    assert e.is_cai_ray and e.token_counts_exact and e.context_length == local.policy.context_length
    convs = [[{"role": "user", "content": f"Tell me about {x}."}] for x in ("cats", "rain", "maps")]
    convs.append(convs[0] + [{"role": "assistant", "content": "Cats are"}])
    greedy = Sampling(temperature=0, max_new_tokens=6)
    texts = e.generate(convs, greedy)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts) and e.tokens_generated > 0
    assert texts == [local.policy.generate([c], greedy)[0] for c in convs]
    assert e.token_counts(convs) == local.policy.token_counts(convs)
    sampled = e.generate([convs[0]] * 2, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3))
    assert sampled[0] != sampled[1]  # one seed per conversation, not one per call

    pairs = ([convs[0], convs[1]], ["I won't.", "Sure, here it is."], ["Here is how.", "No."])
    remote = Labeler(e, local.constitution, LabelSettings(principles_per_pair=2)).label(["p1", "p2"], *pairs)
    here = Labeler(local.policy, local.constitution, LabelSettings(principles_per_pair=2)).label(["p1", "p2"], *pairs)
    for r, h in zip(remote, here):
        assert r.principle_ids == h.principle_ids and r.p_a == pytest.approx(h.p_a, abs=1e-6)
    with pytest.raises(ValueError, match="labels with another method than this job.*both_orders"):
        Labeler(e, local.constitution, LabelSettings(both_orders=False))


def test_a_label_job_with_the_server_as_its_labeler(server, tmp_path, model):
    """`cai-ray label` with labeler.backend=openai: every pair labelled through /v1/label,
    rows name the endpoint, the manifest records it."""
    from cai_ray.config import load_config
    from cai_ray.label.config import LabelConfig
    from cai_ray.label.run import label

    src = tmp_path / "pairs.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"question {i}?", "response_a": f"yes {i}", "response_b": f"no {i}"})
            + "\n"
            for i in range(5)
        )
    )
    cfg = load_config(
        LabelConfig,
        None,
        [
            f"input={src}",
            f"output={tmp_path / 'out'}",
            "labeler.backend=openai",
            f"labeler.model={model}",
            f"labeler.base_url={server}/v1",
            "labeler.api_key_env=CAI_RAY_API_KEY",
            "labeler_pool.cpus_per_actor=0.25",
            "labeler_pool.batch_size=2",
        ],
    )
    m = label(cfg)
    assert m["counts"]["written"] == 5 and m["counts"]["rejected"] == 0 and m["labels"]["labels"] == 5
    assert m["models"]["labeler"] == {"name": model, "backend": "openai", "base_url": f"{server}/v1"}
    import pyarrow.parquet as pq

    rows = [r for f in sorted((tmp_path / "out" / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert {r["labeler"] for r in rows} == {f"{model}@{server}/v1"} and all(0 < r["p_a"] < 1 for r in rows)


def test_the_classifier_guard_cuts_a_live_vllm_stream(client, settings, engine, tmp_path, monkeypatch):
    """`guard: classifier` on vLLM's live stream (hf and the whole-answer path:
    test_serve_guard.py), on this module's engine: a classifier trained on a word vLLM
    greedily writes 17-24 tokens into one answer cuts that stream at the 24-token check — the
    client gets the 16 tokens that passed, then the refusal — and the same answer not
    streamed is the refusal alone; another prompt's stream is the engine's answer, unchanged."""
    if engine != "vllm":
        pytest.skip("the hf engine's guard: tests/integration/test_serve_guard.py")
    from fastapi.testclient import TestClient

    from cai_ray.serve.api import build_app, key_digest
    from cai_ray.serve.guard import load_guard, token_ends
    from tests.support.guard import build_guard_folder

    c, service = client
    greedy = Sampling(temperature=0, max_new_tokens=32)
    cut, clean = "Tell me about cats.", "Hello!"
    answers = {p: service.policy.generate([[{"role": "user", "content": p}]], greedy)[0] for p in (cut, clean)}
    ends = token_ends(service.policy.tokenizer, answers[cut])
    pieces = [answers[cut][a:b] for a, b in zip([0, *ends], ends)]
    planted = next(
        (
            p.strip()
            for i, p in enumerate(pieces[16:24], 16)
            if p.startswith(" ") and p[1:].isalpha() and len(p) > 5
            if p.strip() not in answers[cut][: ends[i - 1]] + answers[clean] + cut + clean
        ),
        None,
    )
    assert planted, f"no word to plant in tokens 17-24 of {pieces}"
    folder = build_guard_folder(tmp_path / "classifiers", planted)
    guarded = dataclasses.replace(
        settings,
        guard="classifier",
        classifier=dataclasses.replace(
            settings.classifier, path=str(folder), every_tokens=8, log=str(tmp_path / "g.jsonl")
        ),
    )
    monkeypatch.setattr(
        service, "guard", load_guard(guarded.classifier, service.constitution, service.policy.tokenizer)
    )
    g = TestClient(build_app(service, guarded, key_digest(KEY)))

    def ask(prompt, stream):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0, "stream": stream}
        r = g.post("/v1/chat/completions", headers=AUTH, json=body)
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["choices"][0]["message"]["content"], r.json()["cai_guard"]
        chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
        return text, chunks[-1]["cai_guard"], chunks[-1]["choices"][0]["finish_reason"]

    refusal = service.constitution.refusal
    text, sg, finish = ask(cut, True)
    assert text == answers[cut][: ends[15]] + "\n\n" + refusal and finish == "content_filter"
    assert sg["decision"] == "refused" and sg["stage"] == "output" and sg["tokens_checked"] == 24
    assert ask(cut, False) == (refusal, sg)
    text, sg, finish = ask(clean, True)
    assert text == answers[clean] and sg["decision"] == "passed" and finish in ("stop", "length")
