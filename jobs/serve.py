"""ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/serve_tiny.yaml api_key_file=$HOME/.cai-ray/api_key

Serving: the aligned policy (OpenAI-compatible /v1/chat/completions), the AI labeler
(/v1/label), critiques and the optional guardrail, as one Ray Serve application on the
cluster, autoscaled between scaling.min_replicas and scaling.max_replicas.

The job deploys the app, waits until it answers /healthz, prints its URL and ends; the app
stays up (Ray Serve's controller owns it) until `serve shutdown` or the next deploy under
the same name replaces it. The API key: a file on the cluster's nodes (api_key_file; a
submitted job does not see the submitter's environment, and a runtime_env would show the
key in the dashboard), or $CAI_RAY_API_KEY where the driver runs.

On a GPU cluster:
    ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . -- \\
        python jobs/serve.py --config jobs/configs/serve_gpu.yaml api_key_file=/etc/cai-ray/api_key
On KubeRay prefer cluster/kuberay/rayservice.yaml (the same app through
cai_ray.serve.deployment:build, with zero-downtime upgrades). Without a cluster:
    CAI_RAY_API_KEY=... python jobs/serve.py --config jobs/configs/serve_tiny.yaml --block
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cai_ray.config import load_config
from cai_ray.runtime import setup_logging  # noqa: E402
from cai_ray.serve.config import ServeConfig  # noqa: E402


def wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(1)
    raise SystemExit(f"the app did not become healthy at {url}/healthz within {timeout_s:.0f}s ({last})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--block", action="store_true", help="keep the driver running (and the app with a local Ray)")
    parser.add_argument("--health-timeout", type=float, default=600, help="seconds to wait for /healthz")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging()

    from cai_ray.serve.deployment import APP_NAME, start, wait_forever

    cfg = load_config(ServeConfig, args.config, args.overrides)
    url = start(cfg)  # join the cluster → Serve proxy on host:port → deploy the app (replaced if running)
    wait_healthy(url, args.health_timeout)
    print(
        json.dumps(
            {
                "app": APP_NAME,
                "url": url,
                "openai_base_url": f"{url}/v1",
                "model": cfg.policy.model,
                "replicas": [cfg.scaling.min_replicas, cfg.scaling.max_replicas],
            }
        ),
        flush=True,
    )
    if args.block:
        wait_forever()


if __name__ == "__main__":
    main()
