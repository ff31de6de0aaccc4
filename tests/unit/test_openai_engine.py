"""The `openai` engine backend against a scripted OpenAI-compatible endpoint (an httpx mock
transport that answers like vLLM): what it sends, how it reads logprobs, and its errors.
The same engine against the real `cai-ray serve` app is tested in test_serve.py."""

import json
import math

import httpx
import pytest

from cai_ray.engine import EngineUnavailable, Sampling, Unscored
from cai_ray.engine.openai_api import EngineError


class Endpoint:
    """A vLLM-like endpoint: /v1/models with max_model_len, chat completions (with
    top_logprobs when asked), no /tokenize and no /v1/cai unless told."""

    def __init__(self, top=None, logprobs=True, max_model_len=4096, key=None, tokenize=False, busy=0):
        self.top, self.logprobs, self.max_model_len, self.key, self.tokenize = (
            top,
            logprobs,
            max_model_len,
            key,
            tokenize,
        )
        self.busy = busy  # answer this many requests with 503 first (overload)
        self.requests: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"error": {"message": "bad key"}})
        path = request.url.path
        if self.busy:
            self.busy -= 1
            return httpx.Response(503, json={"error": {"message": "busy"}}, headers={"retry-after": "0"})
        if path == "/v1/models":
            card = {"id": "big", "object": "model", "created": 0, "owned_by": "vllm"}
            if self.max_model_len:
                card["max_model_len"] = self.max_model_len
            return httpx.Response(200, json={"object": "list", "data": [card]})
        if path == "/tokenize" and self.tokenize:
            body = json.loads(request.content)
            return httpx.Response(200, json={"count": 7 * len(body["messages"]), "max_model_len": 4096})
        if path != "/v1/chat/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        self.requests.append(body)
        choice = {
            "index": 0,
            "finish_reason": "length",
            "message": {"role": "assistant", "content": f" answer {body.get('seed')} "},
        }
        if body.get("logprobs") and self.logprobs:
            top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in self.top]
            choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
        return httpx.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "big",
                "choices": [choice],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            },
        )


def engine(endpoint, **kw):
    from cai_ray.engine.openai_api import OpenAIEngine

    return OpenAIEngine(
        model=kw.pop("model", "big"),
        base_url="http://llm.test/v1",
        max_retries=kw.pop("max_retries", 0),
        transport=httpx.MockTransport(endpoint),
        **kw,
    )


def test_choice_logprobs_read_the_first_tokens_top_logprobs():
    # "A" once, "B" as " B" and "B" (summed), and a token that is neither
    ep = Endpoint(top=[("A", math.log(0.6)), (" B", math.log(0.2)), ("B", math.log(0.1)), ("C", math.log(0.1))])
    e = engine(ep)
    [row] = e.choice_logprobs(
        [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is: ("}]], ["A", "B"]
    )
    assert math.exp(row[0]) == pytest.approx(0.6 / 0.9) and math.exp(row[1]) == pytest.approx(0.3 / 0.9)
    sent = ep.requests[-1]
    assert sent["max_tokens"] == 1 and sent["logprobs"] is True and sent["top_logprobs"] == 20
    # the prefilled answer is continued, not answered
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert "cai_guardrail" not in sent  # only a cai-ray server knows it


def test_a_choice_missing_from_top_logprobs_is_unscored_and_the_pair_invalid(general_constitution):
    from cai_ray.core.labeler import Labeler, LabelSettings

    e = engine(Endpoint(top=[("A", -0.1), ("The", -3.0)]))
    [row] = e.choice_logprobs([[{"role": "user", "content": "q"}]], ["A", "B"])
    assert isinstance(row, Unscored) and "'B' is not among the endpoint's top 2" in row.reason
    [lab] = Labeler(e, general_constitution, LabelSettings()).label(
        ["p1"], [[{"role": "user", "content": "q"}]], ["a"], ["b"]
    )
    assert lab.p_a is None and "'B' is not among" in lab.invalid


def test_an_endpoint_without_logprobs_cannot_label():
    e = engine(Endpoint(logprobs=False))
    with pytest.raises(EngineUnavailable, match="cannot score label choices: the response had no logprobs"):
        e.choice_logprobs([[{"role": "user", "content": "q"}]], ["A", "B"])


def test_generate_sends_one_seed_per_conversation_and_maps_sampling():
    ep = Endpoint()
    e = engine(ep)
    conv = [{"role": "user", "content": "hi"}]
    out = e.generate([conv, conv], Sampling(temperature=0.0, top_p=0.5, max_new_tokens=9, min_new_tokens=2, seed=5))
    want = [(5 * 1_000_003 + i) % 2**31 for i in range(2)]  # k samples of one prompt must differ
    assert sorted(r["seed"] for r in ep.requests) == want and out == [f"answer {s}" for s in want]
    r = ep.requests[0]
    assert (r["temperature"], r["top_p"], r["max_tokens"], r["min_tokens"]) == (0.0, 1.0, 9, 2)
    assert "continue_final_message" not in r and e.tokens_generated == 6


def test_token_counts_exact_with_tokenize_estimated_without():
    conv = [{"role": "user", "content": "x" * 30}]
    assert engine(Endpoint(tokenize=True)).token_counts([conv]) == [7]
    e = engine(Endpoint())
    assert not e.token_counts_exact and e.token_counts([conv]) == [30 // 3 + 8]
    assert e.context_length == 4096 and e.label_pairs is None


def test_overload_is_retried_then_reported():
    e = engine(Endpoint(tokenize=True, busy=3), max_retries=3)  # /v1/models, /v1/cai, /tokenize each get one 503
    assert e.token_counts_exact and e.token_counts([[{"role": "user", "content": "x"}]]) == [7]
    e.max_retries = 1
    e.http = httpx.Client(transport=httpx.MockTransport(Endpoint(tokenize=True, busy=5)))
    with pytest.raises(EngineError, match="POST http://llm.test/tokenize: 503 busy"):
        e.token_counts([[{"role": "user", "content": "x"}]])


def test_clear_errors_at_start(monkeypatch):
    with pytest.raises(EngineUnavailable, match=r"does not serve 'small'; it serves \['big'\]"):
        engine(Endpoint(), model="small")
    with pytest.raises(EngineUnavailable, match="set engine.max_model_len"):
        engine(Endpoint(max_model_len=None))
    assert engine(Endpoint(max_model_len=None), max_model_len=2048).context_length == 2048
    monkeypatch.setenv("MY_KEY", "wrong")
    with pytest.raises(EngineUnavailable, match=r"refused the API key \(401\): put the key in \$MY_KEY"):
        engine(Endpoint(key="right"), api_key_env="MY_KEY")
    monkeypatch.setenv("MY_KEY", "right")
    assert engine(Endpoint(key="right"), api_key_env="MY_KEY").model_name == "big@http://llm.test/v1"


def test_config_validation():
    from cai_ray.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="backend openai needs the endpoint's URL"):
        EngineConfig(backend="openai", model="big").validate("labeler")
    with pytest.raises(ConfigError, match="only backend openai uses it"):
        EngineConfig(backend="hf", base_url="http://x/v1").validate("labeler")
    cfg = EngineConfig(
        backend="openai", model="big", base_url="http://127.0.0.1:8000/v1", api_key_env="CAI_RAY_API_KEY"
    )
    cfg.validate("labeler")
    assert cfg.engine_kwargs() == {
        "model": "big",
        "base_url": "http://127.0.0.1:8000/v1",
        "api_key_env": "CAI_RAY_API_KEY",
        "max_model_len": None,
        "concurrency": 8,
        "request_timeout_s": 300.0,
    }
