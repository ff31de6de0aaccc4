"""The Ray Serve application: one deployment (FastAPI ingress) whose replicas each hold the
engines. hf: chat generations are batched into the engine with ``@serve.batch``; vllm:
every request goes straight to vLLM's async engine, which batches continuously.

    client ─► Serve proxy (127.0.0.1:PORT, request timeout) ─► CAIServer replicas (autoscaled)
              bounded queue: max_queued_requests → 503         max_ongoing_requests each
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ray import serve

from cai_ray.engine import Sampling
from cai_ray.serve.config import ServeConfig
from cai_ray.serve.service import Service, answer_batch

log = logging.getLogger(__name__)
APP_NAME = "cai-ray"


@serve.ingress()
class CAIServer(Service):
    """A replica. Ray Serve calls the inherited ``check_health`` every few seconds: an engine
    that cannot answer (a dead vLLM engine-core) marks the replica unhealthy and Serve
    replaces it."""

    def __init__(self, settings: ServeConfig, key_sha256: str | None):
        super().__init__(settings)
        self.key_sha256 = key_sha256
        sc = settings.scaling
        self._batched.set_max_batch_size(sc.max_batch_size)
        self._batched.set_batch_wait_timeout_s(sc.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        from cai_ray.serve.api import build_app

        return build_app(self, self.settings, self.key_sha256)

    async def generate(self, messages: list[dict], sampling: Sampling) -> str:
        if self.async_engine:  # vLLM batches continuously across requests itself
            return await super().generate(messages, sampling)
        out = await self._batched((messages, sampling))
        if isinstance(out, Exception):
            raise await self.failure(out) from out
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, items: list[tuple[list[dict], Sampling]]) -> list[str | Exception]:
        return await answer_batch(lambda convs, s: self._run(self.policy.generate, convs, s), items)


def deployment(settings: ServeConfig, key_sha256: str | None):
    """The bound application for ``serve.run``, with scaling and backpressure from config."""
    sc = settings.scaling
    autoscaling = None
    if sc.max_replicas > sc.min_replicas:
        autoscaling = {
            "min_replicas": sc.min_replicas,
            "max_replicas": sc.max_replicas,
            "target_ongoing_requests": sc.target_ongoing_requests,
        }
    opts: dict[str, Any] = {
        "name": "CAIServer",
        "max_ongoing_requests": sc.max_ongoing_requests,
        "max_queued_requests": sc.max_queued_requests,
        "ray_actor_options": {"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
    }
    if autoscaling:
        opts["autoscaling_config"] = autoscaling
    else:
        opts["num_replicas"] = sc.min_replicas
    return serve.deployment(CAIServer).options(**opts).bind(settings, key_sha256)


def api_key(cfg) -> str | None:
    """The bearer token from ``api_key_file`` or $CAI_RAY_API_KEY; an error when auth is on
    and there is none."""
    from cai_ray.serve.api import read_api_key

    return read_api_key(cfg.api_key_file, "auth=false on a trusted host") if cfg.auth else None


def start(cfg) -> str:
    """Run the app on a local or given Ray cluster; returns the base URL."""
    from cai_ray import runtime

    app, auth = application(cfg)
    runtime.init_ray(cfg.ray_address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.scaling.request_timeout_s})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.host}:{cfg.port}"
    log.info("serving %s at %s (auth %s)", cfg.policy.model, url, "on" if auth else "OFF")
    return url


def application(cfg):
    """The bound app of a ServeConfig (the config itself travels to the replicas, with its
    constitution's absolute path; the key as its digest), and whether auth is on."""
    from cai_ray.serve.api import key_digest

    settings = dataclasses.replace(cfg, constitution=str(Path(cfg.constitution).resolve()))
    if cfg.guard == "classifier":
        # checked here, before Ray starts: a bad guard.json is one clear error, not replicas
        # failing one after another; replicas get absolute paths
        from cai_ray.serve.guard import read_guard_spec

        spec = read_guard_spec(cfg.classifier.path)
        log_path = str(Path(cfg.classifier.log).expanduser().resolve()) if cfg.classifier.log else ""
        settings = dataclasses.replace(
            settings, classifier=dataclasses.replace(cfg.classifier, path=spec.folder, log=log_path)
        )
    key = api_key(cfg)
    return deployment(settings, key_digest(key) if key else None), key is not None


def build(args: dict[str, Any]):
    """Serve application builder, for ``serve run`` / ``serve deploy`` / a KubeRay RayService:

        import_path: cai_ray.serve.deployment:build
        args: {config: jobs/configs/serve_gpu.yaml, overrides: ["scaling.max_replicas=8"]}

    The API key comes from $CAI_RAY_API_KEY where the app is built (a Secret in the pod);
    host and port are the Serve config's ``http_options``, not ours."""
    from cai_ray.config import load_config
    from cai_ray.serve.config import ServeConfig

    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; expected config and overrides")
    cfg = load_config(ServeConfig, args.get("config"), list(args.get("overrides") or []))
    return application(cfg)[0]


def wait_forever() -> None:
    """Keep the driver (and so a local Ray cluster) alive until Ctrl-C."""
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
