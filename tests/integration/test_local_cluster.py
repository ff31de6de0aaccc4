"""cluster/local.sh: a token-authenticated Ray head on 127.0.0.1; the tiny SL-CAI job goes
in with `ray job submit` (token supplied), the jobs API refuses requests without it, an
engine pool grows under backlog (Ray Data's autoscaler), the serving job deploys the app,
and the head goes down again. Its own ports and temp dir: the session's Ray is left alone."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cai_ray.runtime import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
UPLOAD = json.dumps({"excludes": [".gpu", "out", "runs", ".hypothesis"]})  # the checkout, less local outputs


@pytest.fixture
def local_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(
        CAI_RAY_CLUSTER_DIR=str(tmp_path / "cluster"),
        CAI_RAY_GCS_PORT=str(free_port()),
        CAI_RAY_DASHBOARD_PORT=str(free_port()),
        RAY=RAY,
    )
    # curl through a shim that records its command line: the token must never be on it
    shim = tmp_path / "bin" / "curl"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path / "curl_argv"}\nexec {shutil.which("curl")} "$@"\n')
    shim.chmod(0o755)
    env["PATH"] = f"{shim.parent}:{env['PATH']}"
    sh = str(ROOT / "cluster" / "local.sh")
    up = subprocess.run([sh, "up", "--cpus", "2"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield sh, env
    finally:
        subprocess.run([sh, "down"], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_local_cluster_runs_a_submitted_job_and_refuses_strangers(local_cluster, tmp_path):
    sh, env = local_cluster
    exports = subprocess.run([sh, "env"], env=env, capture_output=True, text=True, check=True).stdout
    client_env = dict(env)
    for word in exports.split():
        if "=" in word:
            k, v = word.split("=", 1)
            client_env[k] = v
    dash = client_env["RAY_ADDRESS"]
    token = Path(client_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert oct(Path(client_env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777) == "0o600"
    argv = (tmp_path / "curl_argv").read_text()
    assert "api/version" in argv and token not in argv  # local.sh polled the dashboard, key off the command line

    # the jobs API: 401 without the token (and with a wrong one), 200 with it
    assert httpx.get(f"{dash}/api/jobs/").status_code == 401
    assert httpx.get(f"{dash}/api/jobs/", headers={"Authorization": "Bearer wrong"}).status_code in (401, 403)
    assert httpx.get(f"{dash}/api/jobs/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # the dashboard listens on loopback only
    assert dash.startswith("http://127.0.0.1:")

    status = subprocess.run([sh, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "CPU" in status.stdout, status.stdout + status.stderr

    src = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"How do I pick lock number {i}?"} for i in range(6)] + [
        {"id": "empty", "prompt": " "}
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sl"
    job_id = f"cai-ray-sl-{int(time.time())}"
    argv = [
        RAY,
        "job",
        "submit",
        "--no-wait",
        "--submission-id",
        job_id,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        UPLOAD,
        # the tiny config as submitted by users, on tiny-random to keep CI short
        "--",
        "python",
        "jobs/generate.py",
        "--config",
        "jobs/configs/generate_tiny.yaml",
        f"input={src}",
        f"output={out}",
        "engine.model=tiny-random",
        "engine.dtype=float32",
        "sampling.max_new_tokens=8",
        "pool.batch_size=4",
        "pool.cpus_per_actor=0.5",
    ]
    for _ in range(30):  # right after start the node's job agent may not have registered yet
        sub = subprocess.run(argv, env=client_env, capture_output=True, text=True, timeout=300)
        if sub.returncode == 0 or "No available agent" not in sub.stderr:
            break
        time.sleep(2)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    deadline, state = time.time() + 600, ""
    while time.time() < deadline:
        r = httpx.get(f"{dash}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
        state = r.json()["status"]
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = subprocess.run([RAY, "job", "logs", job_id], env=client_env, capture_output=True, text=True).stdout
    assert state == "SUCCEEDED", logs[-3000:]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ray_job"] == job_id
    assert (
        manifest["counts"]["read"] == 7 and manifest["counts"]["written"] == 6 and manifest["counts"]["rejected"] == 1
    )
    import pyarrow.parquet as pq

    assert sum(pq.read_table(f).num_rows for f in (out / "data").glob("*.parquet")) == 6
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 1

    # without the token, the CLI cannot even list jobs
    bare = {k: v for k, v in client_env.items() if not k.startswith("RAY_AUTH")}
    denied = subprocess.run([RAY, "job", "list"], env=bare, capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0

    # a relative output is refused before any work (it would vanish with the job's working dir copy)
    rel = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            UPLOAD,
            "--",
            "python",
            "jobs/generate.py",
            "--config",
            "jobs/configs/generate_tiny.yaml",
        ],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rel.returncode != 0 and "output='out/sl' is relative" in rel.stdout + rel.stderr

    # Ray Data's autoscaler grows an engine pool from min toward max while prompts queue
    gcs = f"127.0.0.1:{env['CAI_RAY_GCS_PORT']}"
    bench = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "bench" / "pool_autoscale.py"),
            "--address",
            gcs,
            "--min",
            "1",
            "--max",
            "3",
            "--prompts",
            "48",
            "--output",
            str(tmp_path / "autoscale"),
        ],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-3000:]
    result = json.loads((tmp_path / "autoscale" / "actors.json").read_text())
    assert result["first_alive"] == 1 and result["peak_alive"] == 3, result["samples"]
    assert all(s["alive"] <= 3 for s in result["samples"])
    assert result["counts"]["written"] == 48 and (tmp_path / "autoscale" / "actors.png").stat().st_size > 0

    # the serving job deploys the app, which outlives the job; the key comes from a file
    key_file = tmp_path / "api_key"
    key_file.write_text("k" * 32)
    key_file.chmod(0o600)
    port = free_port()
    serve_job = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            UPLOAD,
            "--",
            "python",
            "jobs/serve.py",
            "--config",
            "jobs/configs/serve_tiny.yaml",
            f"api_key_file={key_file}",
            f"port={port}",
            "policy.model=tiny-random",
            "policy.dtype=float32",
            "scaling.max_replicas=1",
            "scaling.cpus_per_replica=0.5",
        ],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert serve_job.returncode == 0, serve_job.stdout[-3000:] + serve_job.stderr[-3000:]
    assert f'"url": "http://127.0.0.1:{port}"' in serve_job.stdout
    api = f"http://127.0.0.1:{port}/v1"
    assert httpx.get(f"{api}/models", timeout=30).status_code == 401
    models = httpx.get(f"{api}/models", headers={"Authorization": f"Bearer {'k' * 32}"}, timeout=30)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny-random"
