"""One name per step: the old module, job-script and pipeline-folder names say what they are
now (kept for one release), instead of failing or silently doing something else."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "old, new, names",
    [
        ("cai_ray.sl", "cai_ray.generate", ["generate", "SLWorker"]),
        ("cai_ray.datasets", "cai_ray.readers", ["read_local"]),
    ],
)
def test_an_old_module_name_still_imports_with_a_deprecation_warning(old, new, names):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        mod = importlib.import_module(old)
    for name in names:
        assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_the_old_job_script_runs_the_new_one_and_says_so():
    proc = subprocess.run(
        [sys.executable, "jobs/sl_data.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "jobs/sl_data.py is now jobs/generate.py" in proc.stderr
    assert "ray job submit --working-dir . -- python jobs/generate.py" in proc.stdout  # generate.py's own help


def test_a_pipeline_folder_of_the_old_layout_is_refused_with_the_reason(tmp_path):
    from cai_ray.config import ConfigError, load_config
    from cai_ray.pipeline import PipelineConfig, run_pipeline

    (tmp_path / "run" / "sl_data").mkdir(parents=True)
    pc = load_config(
        PipelineConfig, ROOT / "jobs" / "configs" / "demo.yaml", [f"output={tmp_path / 'run'}", "model=tiny-random"]
    )
    with pytest.raises(ConfigError, match="now generate/ and label/"):
        run_pipeline(pc)
