"""The reward service's pure parts: TRL's input shapes → /v1/reward items, the client's
retry rule (on a stand-in transport), HTTP Basic carrying the key, the reward config guards.
Over real HTTP: tests/integration/test_reward_service.py."""

import base64
import json

import httpx
import pytest


def test_trl_prompts_and_completions_become_reward_items():
    from cai_ray.reward_client import completion_text, reward_item

    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "Hi"}]) == "Hi"
    tool_turns = [
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "image"}, {"text": "42."}]},
    ]
    assert completion_text(tool_turns) == "It is 42."  # the assistant's text only
    assert reward_item("q", "a") == {"prompt": "q", "response": "a"}
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert reward_item(conv, "a", "ref") == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
        "response": "a",
        "reference": "ref",
    }
    assert "reference" not in reward_item("q", "a", "")  # no reference: the server's policy answers


def test_the_client_retries_overload_and_raises_a_refusal_at_once(monkeypatch):
    """503 (with Retry-After) and connection errors are retried; a 400 is raised at once with
    the server's reason; items go out batch_size at a time."""
    from cai_ray import reward_client
    from cai_ray.reward_client import RewardClient, RewardServiceError

    monkeypatch.setattr(reward_client.time, "sleep", lambda s: None)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            raise httpx.ConnectError("refused")
        if len(seen) == 2:
            return httpx.Response(503, headers={"Retry-After": "10"}, json={"error": {"message": "busy"}})
        n = len(json.loads(request.content)["items"])
        return httpx.Response(200, json={"scores": [0.25] * n, "invalid": [None] * n})

    client = RewardClient("http://rm.test/v1", api_key="k" * 16, batch_size=2, retries=2)
    client._http = httpx.Client(transport=httpx.MockTransport(handler))
    assert client(["a", "b", "c"], ["x", "y", "z"]) == [0.25] * 3
    assert [str(r.url) for r in seen] == ["http://rm.test/v1/reward"] * 4  # 2 failures, then 2 batches
    assert seen[-1].headers["authorization"] == "Bearer " + "k" * 16

    def refuse(request):
        seen.append(request)
        return httpx.Response(400, json={"error": {"message": "items[0]: give exactly one of 'prompt' or 'messages'"}})

    seen.clear()
    client._http = httpx.Client(transport=httpx.MockTransport(refuse))
    with pytest.raises(RewardServiceError, match=r"HTTP 400: items\[0\]: give exactly one of"):
        client(["a"], ["x"])
    assert len(seen) == 1
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        client.score(["a", "b"], ["x"])


def test_the_key_may_come_as_http_basic_from_a_url():
    """What aiohttp and requests send for http://user:KEY@host/...: Basic with the key as
    the password (any user name); anything else is refused."""
    from cai_ray.serve.api import key_digest, key_ok

    digest = key_digest("the-key-0123456789")

    def basic(user_pass: bytes) -> str:
        return "Basic " + base64.b64encode(user_pass).decode()

    assert key_ok("Bearer the-key-0123456789", digest) and key_ok(basic(b"cai:the-key-0123456789"), digest)
    assert key_ok(basic(b":the-key-0123456789"), digest)
    for header in (basic(b"the-key-0123456789"), basic(b"cai:wrong"), "Basic !!!", "Token the-key-0123456789", ""):
        assert not key_ok(header, digest), header


def test_reward_config_guards():
    from cai_ray.config import ConfigError, load_config
    from cai_ray.serve.config import ServeConfig

    assert load_config(ServeConfig, None, []).reward.default_scorer == "labeler"
    assert load_config(ServeConfig, None, ["reward.model=rm/model"]).reward.default_scorer == "model"
    assert (
        load_config(ServeConfig, None, ["reward.model=rm/model", "reward.scorer=labeler"]).reward.default_scorer
        == "labeler"
    )
    with pytest.raises(ConfigError, match="reward.scorer: model needs reward.model"):
        load_config(ServeConfig, None, ["reward.scorer=model"])
    with pytest.raises(ConfigError, match="reward.scorer: one of auto, model, labeler"):
        load_config(ServeConfig, None, ["reward.scorer=judge"])
    with pytest.raises(ConfigError, match="reward.max_items"):
        load_config(ServeConfig, None, ["reward.max_items=0"])
