import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT / "constitutions" / "general.yaml"


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
    from cai_ray.constitution import load_constitution

    return load_constitution(GENERAL)


@pytest.fixture
def tmp_copy(tmp_path):
    def copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copy(src, dst)
        return dst

    return copy
