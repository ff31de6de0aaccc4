"""The classifier guard (`cai-ray serve --guard classifier`) over real HTTP on 127.0.0.1, with a
real engine (hf tiny-random, greedy) and a real classifier (tests/support/guard.py: it flags
any text holding the planted word). The planted word in a prompt trips the input check; the
policy greedily writes it two dozen tokens into its answer to CUT_PROMPT, which the output
check cuts at the check after it (every 8 tokens: 8 and 16 pass, 24 flags).

Most tests run the serve app under uvicorn in a thread (the app a replica runs, and its
Service in reach: the engine's token count shows nothing was generated); one starts the
real Ray Serve app with the guard; a bad guard.json stops `cai-ray serve` before Ray starts."""

import json

import httpx
import pytest
from support.asgi_app import app_on_a_port

from cai_ray.engine import Sampling
from cai_ray.serve.guard import check_points, token_ends

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
EVERY = 8
CLEAN_PROMPT, CUT_PROMPT = "Hello!", "Tell me about cats."
MAX_TOKENS = 32
GREEDY = Sampling(temperature=0, max_new_tokens=MAX_TOKENS)


def _overrides(folder, log_path):
    return [
        "policy.model=tiny-random",
        "policy.dtype=float32",
        "policy.threads=1",
        "limits.max_tokens=32",
        "limits.default_max_tokens=8",
        "guard=classifier",
        f"classifier.path={folder}",
        f"classifier.every_tokens={EVERY}",
        f"classifier.log={log_path}",
    ]


@pytest.fixture(scope="module")
def guarded(guard_classifiers, tmp_path_factory):
    """(base URL, Service, guard log path, planted word): the serve app with the guard."""
    from cai_ray.config import load_config
    from cai_ray.serve.api import build_app, key_digest
    from cai_ray.serve.config import ServeConfig
    from cai_ray.serve.service import Service

    folder, planted = guard_classifiers
    log_path = tmp_path_factory.mktemp("guard-log") / "cai_guard.jsonl"
    settings = load_config(ServeConfig, None, _overrides(folder, log_path))
    service = Service(settings)
    with app_on_a_port(build_app(service, settings, key_digest(KEY))) as url:
        yield url, service, log_path, planted


@pytest.fixture(scope="module")
def raw(guarded):
    """The policy's own greedy answers (no guard), and where the planted word falls in them."""
    _, service, _, planted = guarded
    answers = {
        p: service.policy.generate([[{"role": "user", "content": p}]], GREEDY)[0] for p in (CLEAN_PROMPT, CUT_PROMPT)
    }
    ends = token_ends(service.guard.tokenizer, answers[CUT_PROMPT])
    at = next((k for k in range(1, len(ends) + 1) if planted in answers[CUT_PROMPT][: ends[k - 1]]), None)
    # the fixture's premise: pick another planted word (tests/support/guard.py) if the tiny model changed
    assert planted not in answers[CLEAN_PROMPT] and at is not None and 2 * EVERY < at <= 3 * EVERY, (answers, at)
    return answers


def _chat(url, prompt, stream=False, **extra):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={**body, "stream": stream, **extra}, timeout=60)
    if not stream or r.status_code != 200:
        return r, None
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    return r, chunks


def _streamed(chunks):
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"], chunks[-1]["cai_guard"]


def _log(log_path):
    return [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []


def test_a_flagged_prompt_is_refused_without_generating(guarded):
    url, service, log_path, planted = guarded
    before, logged = service.policy.tokens_generated, len(_log(log_path))
    prompt = f"Tell me about the {planted} Amendment."
    r, _ = _chat(url, prompt)
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["message"]["content"] == service.constitution.refusal
    assert body["choices"][0]["finish_reason"] == "content_filter"
    g = body["cai_guard"]
    assert g["decision"] == "refused" and g["stage"] == "input" and g["score"] >= g["threshold"] == 0.5
    r, chunks = _chat(url, prompt, stream=True)
    text, finish, sg = _streamed(chunks)
    assert (text, finish, sg) == (service.constitution.refusal, "content_filter", g)
    assert service.policy.tokens_generated == before  # nothing was generated for either
    lines = _log(log_path)[logged:]
    assert [(x["decision"], x["stage"], x["stream"], x["output"]) for x in lines] == [
        ("refused", "input", False, None),
        ("refused", "input", True, None),
    ]
    assert lines[0]["score"] == lines[0]["input"]["score"] == g["score"] and lines[0]["request_id"] == body["id"]


def test_a_clean_prompt_passes_unchanged(guarded, raw):
    url, service, log_path, _ = guarded
    logged = len(_log(log_path))
    r, _ = _chat(url, CLEAN_PROMPT)
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["message"]["content"] == raw[CLEAN_PROMPT]
    n = len(token_ends(service.guard.tokenizer, raw[CLEAN_PROMPT]))
    g = body["cai_guard"]
    assert g["decision"] == "passed" and g["stage"] == "output" and g["score"] < g["threshold"]
    assert g["input_score"] < 0.5 and g["tokens_checked"] == n and g["checks"] == len(check_points(n, EVERY))
    r, chunks = _chat(url, CLEAN_PROMPT, stream=True)
    text, finish, sg = _streamed(chunks)
    assert text == raw[CLEAN_PROMPT] and finish == body["choices"][0]["finish_reason"] and sg == g
    [line, _] = _log(log_path)[logged:]
    assert line["decision"] == "passed" and [k for k, _ in line["output"]["checks"]] == check_points(n, EVERY)
    assert all(s < 0.5 for _, s in line["output"]["checks"])


def test_an_answer_flagged_midway_is_cut_and_replaced_whole_and_streamed(guarded, raw):
    """Non-streaming: the refusal alone. SSE: the text that passed its check (the first 16
    tokens, without the planted word), then the refusal; finish_reason content_filter."""
    url, service, log_path, planted = guarded
    logged = len(_log(log_path))
    refusal = service.constitution.refusal
    r, _ = _chat(url, CUT_PROMPT)
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["message"]["content"] == refusal
    g = body["cai_guard"]
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert g["decision"] == "refused" and g["stage"] == "output" and g["tokens_checked"] == 3 * EVERY
    assert g["score"] >= 0.5 > g["input_score"] and g["checks"] == 3
    r, chunks = _chat(url, CUT_PROMPT, stream=True)
    text, finish, sg = _streamed(chunks)
    shown, _, tail = text.partition("\n\n")
    ends = token_ends(service.guard.tokenizer, raw[CUT_PROMPT])
    assert shown == raw[CUT_PROMPT][: ends[2 * EVERY - 1]] and planted not in shown
    assert tail == refusal and finish == "content_filter" and sg == g
    lines = _log(log_path)[logged:]
    for line in lines:
        assert line["decision"] == "refused" and line["stage"] == "output"
        assert [k for k, _ in line["output"]["checks"]] == [EVERY, 2 * EVERY, 3 * EVERY]
        assert [s >= 0.5 for _, s in line["output"]["checks"]] == [False, False, True]
    assert [x["stream"] for x in lines] == [False, True]


def test_a_classifier_failure_fails_that_request_alone(guarded, monkeypatch):
    """The classifier raising: that request gets a 500 naming it (out of memory: 503 with
    Retry-After), logged as an error; the next request is answered."""
    import torch

    url, service, log_path, _ = guarded
    real = service.guard.output.scores

    def scores(texts):
        if any("explode" in t for t in texts):
            raise RuntimeError("classifier broke")
        if any("oom" in t for t in texts):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(texts)

    monkeypatch.setattr(service.guard.output, "scores", scores)
    r, _ = _chat(url, "please explode")
    assert r.status_code == 500 and "the guard's output classifier failed" in r.json()["error"]["message"], r.text
    assert "RuntimeError: classifier broke" in r.json()["error"]["message"]
    r, _ = _chat(url, "oom here")
    assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
    assert _log(log_path)[-1]["decision"] == "error" and "out of memory" in _log(log_path)[-1]["error"]
    r, _ = _chat(url, CLEAN_PROMPT)
    assert r.status_code == 200 and r.json()["cai_guard"]["decision"] == "passed"


def test_the_ray_serve_app_with_the_guard(ray_local, guard_classifiers, tmp_path, monkeypatch, raw):
    """The real Serve app (`cai-ray serve --guard classifier --classifiers DIR`): replicas
    load the classifiers; a flagged prompt and a cut answer through Serve's proxy, each
    decision a line in the guard log."""
    from ray import serve

    from cai_ray.config import load_config
    from cai_ray.runtime import free_port
    from cai_ray.serve.config import ServeConfig
    from cai_ray.serve.deployment import start

    folder, planted = guard_classifiers
    monkeypatch.setenv("CAI_RAY_API_KEY", KEY)
    log_path = tmp_path / "cai_guard.jsonl"
    port = free_port()
    cfg = load_config(
        ServeConfig, None, [*_overrides(folder, log_path), f"port={port}", "scaling.cpus_per_replica=0.5"]
    )
    url = start(cfg)
    try:
        r, _ = _chat(url, f"Who was the {planted}?")
        assert r.status_code == 200 and r.json()["cai_guard"]["stage"] == "input", r.text
        r, chunks = _chat(url, CUT_PROMPT, stream=True)
        text, finish, g = _streamed(chunks)
        assert (
            finish == "content_filter"
            and g["stage"] == "output"
            and text.endswith(r"I'm glad to help with that instead.")
        )
        assert planted not in text and text.startswith(raw[CUT_PROMPT].split()[0])
    finally:
        serve.shutdown()
    lines = _log(log_path)
    assert [(x["decision"], x["stage"]) for x in lines] == [("refused", "input"), ("refused", "output")]


def test_a_bad_guard_json_stops_serve_with_a_clear_error(tmp_path, capsys, monkeypatch):
    from cai_ray.cli import main

    monkeypatch.setenv("CAI_RAY_API_KEY", KEY)
    (tmp_path / "guard.json").write_text(json.dumps({"input": {"model": "input/model", "threshold": 2}}))
    assert main(["serve", "--policy", "tiny-random", "--guard", "classifier", "--classifiers", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "guard.json: input.model:" in err and "is not a model folder" in err, err
    assert "input.threshold: must be a number in [0, 1], got 2" in err and "'output': must be an object" in err
    assert main(["serve", "--policy", "tiny-random", "--guard", "classifier"]) == 2
    assert "guard: classifier needs classifier.path (--classifiers DIR)" in capsys.readouterr().err


def test_a_live_stream_is_held_back_and_cut_as_the_whole_answer_is(guarded, raw, monkeypatch):
    """The streaming engines' path (vLLM: ``service.streams``), fed the policy's own greedy
    answer token by token as vLLM's deltas come: the same SSE text, finish reason and
    ``cai_guard`` as the whole-answer path, and the engine's stream closed at the cut."""
    url, service, log_path, planted = guarded
    closed = []

    async def stream(msgs, sampling):
        text = service.policy.generate([msgs], sampling)[0]
        ends = token_ends(service.guard.tokenizer, text)
        try:
            for a, b in zip([0, *ends], ends):
                yield text[a:b]
        finally:
            closed.append(msgs[-1]["content"])

    whole = {p: _streamed(_chat(url, p, stream=True)[1]) for p in (CLEAN_PROMPT, CUT_PROMPT)}
    monkeypatch.setattr(type(service), "streams", property(lambda self: True))
    monkeypatch.setattr(service, "stream", stream)
    for prompt in (CLEAN_PROMPT, CUT_PROMPT):
        r, chunks = _chat(url, prompt, stream=True)
        assert r.status_code == 200 and _streamed(chunks) == whole[prompt], prompt
    assert closed == [CLEAN_PROMPT, CUT_PROMPT]
    assert whole[CUT_PROMPT][1] == "content_filter" and planted not in whole[CUT_PROMPT][0]
    assert [x["stream"] for x in _log(log_path)[-2:]] == [True, True]
