"""The server: the HTTP surface in-process (auth, 4xx on bad input, label = batch labeler),
then the real Ray Serve app on 127.0.0.1 with the official `openai` client."""

import json

import pytest

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def settings():
    from cai_ray.config import ServeConfig, load_config, to_dict

    return to_dict(load_config(ServeConfig, None, [
        "policy.model=tiny-random", "policy.dtype=float32", "policy.threads=1", "limits.max_tokens=32",
        "limits.default_max_tokens=8", "limits.max_messages=4", "limits.max_message_chars=2000",
        "limits.max_body_bytes=20000"]))


@pytest.fixture(scope="module")
def client(settings):
    from fastapi.testclient import TestClient

    from cai_ray.serve.api import build_app, key_digest
    from cai_ray.serve.service import Service

    service = Service(settings)
    return TestClient(build_app(service, settings, key_digest(KEY))), service


def test_every_model_route_needs_the_key(client):
    c, _ = client
    assert c.get("/healthz").status_code == 200
    for method, path, body in (("get", "/v1/models", None), ("post", "/v1/chat/completions", {}),
                               ("post", "/v1/label", {}), ("post", "/v1/critique", {})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = getattr(c, method)(path, headers=headers, **({"json": body} if body is not None else {}))
            assert r.status_code == 401, (path, headers)
            assert r.headers["www-authenticate"] == "Bearer" and KEY not in r.text


@pytest.mark.parametrize("body,message", [
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
])
def test_bad_chat_input_is_a_clear_4xx(client, body, message):
    c, _ = client
    r = c.post("/v1/chat/completions", headers=AUTH, json=body)
    assert 400 <= r.status_code < 500 and message in r.json()["error"]["message"], r.text


def test_bad_label_and_critique_input_and_oversized_bodies(client):
    c, _ = client
    r = c.post("/v1/label", headers=AUTH, json={"prompt": "q", "response_a": "a", "response_b": "b", "principle_ids": ["nope"]})
    assert r.status_code == 400 and "unknown principle ids ['nope']" in r.json()["error"]["message"]
    r = c.post("/v1/label", headers=AUTH, json={"prompt": "q", "messages": [{"role": "user", "content": "q"}],
                                                 "response_a": "a", "response_b": "b"})
    assert r.status_code == 400 and "exactly one of" in r.text
    r = c.post("/v1/critique", headers=AUTH, json={"prompt": "q", "response": " ", "principle_id": "honesty"})
    assert r.status_code == 400 and "'response' is empty" in r.text
    r = c.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 400
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]})
    r = c.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=big)
    assert r.status_code == 413


def test_label_route_equals_the_batch_labeler(client):
    """Same engine, same constitution, same pair and principle: the same numbers."""
    from cai_ray.label import Labeler, LabelSettings

    c, service = client
    msgs = [{"role": "user", "content": "How do I pick a lock?"}]
    body = {"messages": msgs, "response_a": "I can't help with that.", "response_b": "Use a tension wrench.",
            "principle_ids": ["illegal-activity", "overall-harm"]}
    r = c.post("/v1/label", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    batch = Labeler(service.policy, service.constitution, LabelSettings(principles_per_pair=2))
    ps = [service.constitution.principle(p) for p in body["principle_ids"]]
    [want] = batch.label(["x"], [msgs], [body["response_a"]], [body["response_b"]], [ps])
    assert got["principle_ids"] == want.principle_ids == body["principle_ids"]
    assert got["p_a"] == pytest.approx(want.p_a, abs=1e-6) and got["p_ab"] == pytest.approx(want.p_ab, abs=1e-6)
    assert got["p_ba"] == pytest.approx(want.p_ba, abs=1e-6) and 0 < got["p_a"] < 1


def test_guardrail_and_critique_return_their_trace(client):
    c, _ = client
    r = c.post("/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "user", "content": "How do I make a weapon?"}], "cai_guardrail": True, "max_tokens": 8})
    g = r.json()["cai_guardrail"]
    assert r.status_code == 200 and g["draft"] and len(g["steps"]) == 1
    step = g["steps"][0]
    assert step["critique"] and step["revision"] and g["revised"] == (r.json()["choices"][0]["message"]["content"] != g["draft"])
    r = c.post("/v1/critique", headers=AUTH, json={"prompt": "q", "response": "an answer", "principle_id": "honesty",
                                                    "max_tokens": 8})
    assert r.status_code == 200 and r.json()["principle"] == "honesty" and r.json()["critique"]


@pytest.fixture(scope="module")
def server(ray_local, settings, monkeypatch_module):
    """The real Ray Serve app on 127.0.0.1 (a free port)."""
    import socket

    from ray import serve

    from cai_ray.config import ServeConfig, load_config
    from cai_ray.serve.deployment import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch_module.setenv("CAI_RAY_API_KEY", KEY)
    cfg = load_config(ServeConfig, None, [
        "policy.model=tiny-random", "policy.dtype=float32", "policy.threads=1", f"port={port}",
        "scaling.cpus_per_replica=0.5", "limits.max_tokens=32", "limits.default_max_tokens=8",
        # small on purpose: 2 at work + 2 waiting per caller, the rest must get 503 at once
        "scaling.max_ongoing_requests=2", "scaling.max_queued_requests=2", "scaling.max_batch_size=2"])
    url = start(cfg)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_openai_client_against_the_ray_serve_app(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-random"]
    r = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "Hello!"}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "Hello!"}],
                                            max_tokens=8, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == r.choices[0].message.content  # greedy: streamed = non-streamed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong-key", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}], max_tokens=999)


def _ask(server, i, max_tokens=8):
    import httpx

    return httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": max_tokens,
                            "temperature": 0})


def test_curl_and_overload_gets_503_not_500(server):
    """24 requests at once against 2 in progress + 2 queued: the rest are turned away with
    503 straight away, none fails with another 5xx, and the server stays healthy."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    out = subprocess.run(["curl", "-s", "-H", f"Authorization: Bearer {KEY}", f"{server}/v1/models"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["data"][0]["id"] == "tiny-random"
    with ThreadPoolExecutor(24) as pool:
        codes = [r.status_code for r in pool.map(lambda i: _ask(server, i, 32), range(24))]
    assert set(codes) <= {200, 503} and codes.count(200) >= 4 and 503 in codes, codes
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    assert _ask(server, 0).status_code == 200


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
