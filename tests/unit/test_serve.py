"""The server: the HTTP surface in-process (auth, 4xx on bad input, label = batch labeler),
then the real Ray Serve app on 127.0.0.1 with the official `openai` client. Every test runs
on an hf replica and on a vLLM one (vLLM's CPU build, continuous batching, live streaming)."""

import pytest

from cai_ray.engine import Sampling


def test_one_failing_request_fails_alone_in_its_batch():
    """Control flow of the @serve.batch body, with a stand-in generate that fails on one
    conversation: the batch is retried one by one, the culprit gets its error, the rest their
    answers, in request order."""
    import asyncio

    from cai_ray.serve.service import answer_batch

    calls = []

    async def generate(convs, sampling):
        calls.append(len(convs))
        if any(c[0]["content"] == "bad" for c in convs):
            raise ValueError("seed out of range")
        return [c[0]["content"].upper() for c in convs]

    greedy, sampled = Sampling(temperature=0), Sampling(temperature=1.0, seed=3)
    items = [
        ([{"role": "user", "content": t}], s)
        for t, s in (("a", greedy), ("bad", greedy), ("c", sampled), ("d", greedy))
    ]
    out = asyncio.run(answer_batch(generate, items))
    assert out[0] == "A" and out[2] == "C" and out[3] == "D"
    assert isinstance(out[1], ValueError) and "seed out of range" in str(out[1])
    assert calls == [3, 1, 1, 1, 1]  # greedy group, its three retries, the sampled group


def test_serve_config_guards():
    from cai_ray.config import ConfigError, load_config
    from cai_ray.serve.config import ServeConfig

    assert load_config(ServeConfig, None, ["guardrail=enforce"]).guardrail == "enforce"
    with pytest.raises(ConfigError, match="true, false or enforce"):
        load_config(ServeConfig, None, ["guardrail=always"])
    with pytest.raises(ConfigError, match="insecure_public"):
        load_config(ServeConfig, None, ["auth=false", "host=0.0.0.0"])
    assert not load_config(ServeConfig, None, ["auth=false", "host=0.0.0.0", "insecure_public=true"]).auth
    assert not load_config(ServeConfig, None, ["auth=false"]).auth  # loopback


def test_engine_failures_are_503s_and_the_rest_stay_this_requests_400():
    """Service.failure, the one place an engine's exception becomes a status: out of memory
    (torch's OutOfMemoryError, a "CUDA out of memory" RuntimeError), a dead vLLM engine
    (EngineDeadError), or any error while the engine's health check fails → EngineDown (503,
    retry); anything else is this request's RequestError (400)."""
    import asyncio

    import torch

    from cai_ray.serve.service import EngineDown, RequestError, Service

    class EngineDeadError(Exception):  # vLLM's, matched by name (vLLM is not imported)
        pass

    class Engine:
        dead = False

        def check_health(self):
            if self.dead:
                raise RuntimeError("the vLLM engine died: EngineCore process exited")

    service = object.__new__(Service)  # only its engines: failure() needs no model
    service.policy = service.labeler_engine = Engine()

    def told(e):
        return asyncio.run(service.failure(e))

    for e in (
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        EngineDeadError("EngineCore encountered an issue"),
    ):
        got = told(e)
        assert isinstance(got, EngineDown) and "retry" in str(got) and type(e).__name__ in str(got), got
    bad = told(ValueError("seed out of range"))
    assert isinstance(bad, RequestError) and "seed out of range" in str(bad)
    service.policy.dead = True  # an odd error, and the engine now fails its health check
    got = told(RuntimeError("stream closed"))
    assert isinstance(got, EngineDown) and "the vLLM engine died" in str(got)
