"""The `openai` engine backend against a scripted OpenAI-compatible endpoint (an httpx mock
transport that answers like vLLM): what it sends, how it reads logprobs, and its errors.
The same engine against the real `cai-ray serve` app is tested in test_serve.py."""


def test_the_api_key_reaches_engine_actors_as_a_ray_object_not_in_their_spec(ray_local, monkeypatch):
    """No runtime_env (the dashboard shows it), no plain string among the constructor
    arguments: the key travels as an object reference the engine resolves."""
    from cai_ray.batch.stage import actor_engine_kwargs, actor_pool_args
    from cai_ray.config import EngineConfig

    monkeypatch.setenv("MY_KEY", "sk-secret-0123456789abcdef")
    cfg = EngineConfig(backend="openai", model="m", base_url="http://127.0.0.1:1/v1", api_key_env="MY_KEY")
    kwargs = actor_engine_kwargs(cfg)
    assert "sk-secret" not in repr(kwargs) and ray_local.get(kwargs["api_key_ref"]) == "sk-secret-0123456789abcdef"

    class Pool:
        batch_size, min_actors, max_actors, cpus_per_actor, gpus_per_actor = 4, 1, 1, 0.5, 0

    assert "runtime_env" not in actor_pool_args(Pool)
    monkeypatch.delenv("MY_KEY")
    assert "api_key_ref" not in actor_engine_kwargs(cfg)
