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
        ("cai_ray.sl", "cai_ray.generate.run", ["generate", "SLWorker"]),
        ("cai_ray.datasets", "cai_ray.batch.readers", ["read_local"]),
        ("cai_ray.stage", "cai_ray.batch.stage", ["run_stage"]),
        ("cai_ray.labeler", "cai_ray.core.labeler", ["Labeler"]),
        ("cai_ray.train.reward", "cai_ray.train.ppo.reward", ["RewardScorer"]),
    ],
)
def test_an_old_module_name_still_imports_with_a_deprecation_warning(old, new, names):
    """Modules moved into the packages (core, batch, the steps): the old name is the same
    module object (never a second copy of it), and says where it went."""
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)
    for name in names:
        assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_a_config_class_under_its_old_home_is_the_same_class_with_a_deprecation_warning():
    import cai_ray.config
    from cai_ray.label.config import LabelConfig

    with pytest.warns(DeprecationWarning, match="cai_ray.config.LabelConfig is now cai_ray.label.config"):
        assert cai_ray.config.LabelConfig is LabelConfig
    with pytest.raises(AttributeError):
        cai_ray.config.NoSuchConfig  # noqa: B018


def test_the_old_job_script_runs_the_new_one_and_says_so():
    proc = subprocess.run(
        [sys.executable, "jobs/sl_data.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "jobs/sl_data.py is now jobs/generate.py" in proc.stderr
    assert "ray job submit --working-dir . -- python jobs/generate.py" in proc.stdout  # generate.py's own help


@pytest.mark.parametrize("old, new", [("sl_data", "generate/"), ("labels", "label/"), ("rl", "ppo/ or dpo/")])
def test_a_pipeline_folder_of_the_old_layout_is_refused_with_the_reason(tmp_path, old, new):
    from cai_ray.config import ConfigError, load_config
    from cai_ray.pipeline.config import PipelineConfig
    from cai_ray.pipeline.run import run_pipeline

    (tmp_path / "run" / old).mkdir(parents=True)
    pc = load_config(
        PipelineConfig, ROOT / "jobs" / "configs" / "demo.yaml", [f"output={tmp_path / 'run'}", "model=tiny-random"]
    )
    with pytest.raises(ConfigError, match=f"{old}/ is now {new}"):
        run_pipeline(pc)


def test_the_label_methods_old_key_still_works_with_a_deprecation_message(caplog):
    """`label:` named the labeling method beside `labeler:` (its model); it is `method:` now.
    Old files and overrides keep working for a release, and say so; both keys is an error."""
    from cai_ray.config import ConfigError, load_config
    from cai_ray.label.config import LabelConfig
    from cai_ray.serve.config import ServeConfig
    from cai_ray.train.ppo.config import RLTrainConfig

    with caplog.at_level("WARNING", logger="cai_ray.config"):
        cfg = load_config(LabelConfig, None, ["input=x.jsonl", "output=o", "label.few_shot=2", "labeler.model=m"])
        serve = load_config(ServeConfig, None, ["policy.model=tiny-random", "label.principles_per_pair=3"])
        rl = load_config(
            RLTrainConfig,
            None,
            ["data=x.jsonl", "output=o", "reward.labeler.model=tiny-random", "reward.label.both_orders=false"],
        )
    assert cfg.method.few_shot == 2 and serve.method.principles_per_pair == 3 and rl.reward.method.both_orders is False
    assert "'label' is deprecated" in caplog.text and "'reward.label' is deprecated" in caplog.text
    with pytest.raises(ConfigError, match="both given"):
        load_config(LabelConfig, None, ["input=x.jsonl", "output=o", "label.cot=true", "method.cot=true"])
