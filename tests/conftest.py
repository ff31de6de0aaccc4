import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cai_ray.runtime import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT / "constitutions" / "general.yaml"
# the most the suite holds on disk at once, measured: 8.2 GiB (the SmolLM2 pipeline test; 6.8 the two-worker SFT)
PEAK_DISK_GB = 9


def pytest_report_header(config):
    """Free disk where the tests write: a full disk fails a training test deep into the run
    (Ray Train's checkpoint copy), so say up front when there is too little."""
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    line = f"disk: {free:.1f} GiB free in {tempfile.gettempdir()} (the suite needs about {PEAK_DISK_GB} GiB)"
    return line if free >= PEAK_DISK_GB else f"{line}\nWARNING: too little disk; training tests will fail"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance on 127.0.0.1 for the whole session (2 CPUs, like CI)."""
    import ray

    from cai_ray.runtime import init_ray

    init_ray(None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model():
    from cai_ray.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture
def general_constitution():
    from cai_ray.core.constitution import load_constitution

    return load_constitution(GENERAL)


@pytest.fixture
def tmp_copy(tmp_path):
    def copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copy(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on 127.0.0.1 (moto's server) with buckets `prompts` and `outputs`:
    (environment for clients, boto3 client)."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        for _ in range(100):
            try:
                httpx.get(env["AWS_ENDPOINT_URL"], timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="test-key",
            aws_secret_access_key="test-secret",
        )
        client.create_bucket(Bucket="prompts")
        client.create_bucket(Bucket="outputs")
        yield env, client
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def s3_env(s3, monkeypatch):
    env, client = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return client


@pytest.fixture(scope="module")
def token_rm(tmp_path_factory, tiny_model):
    """A preference model folder (tiny-random with a one-output head), as `train rm` writes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def guard_classifiers(tmp_path_factory):
    """A `cai-ray classifiers` OUTPUT folder for the serve guard (tests/support/guard.py): a
    tiny classifier that flags any text holding the planted word, as both the input and the
    output classifier, thresholds 0.5, guard.json. ~5 s. Returns (folder, planted word)."""
    from cai_ray.core.constitution import load_constitution
    from tests.support.guard import PLANTED, build_guard_folder

    folder = build_guard_folder(
        tmp_path_factory.mktemp("classifiers"), PLANTED, constitution=load_constitution(GENERAL)
    )
    return folder, PLANTED
