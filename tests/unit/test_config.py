from pathlib import Path

import pytest

from cai_ray.config import ConfigError, describe, load_config
from cai_ray.generate.config import GenerateConfig

BASE = ["input=x.jsonl", "output=out"]


def test_defaults_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("revisions: 2\nsampling:\n  temperature: 0\npool:\n  max_actors: 3\n")
    cfg = load_config(
        GenerateConfig, cfg_file, BASE + ["sampling.max_new_tokens=12", "pool.max_actors=4"], flags={"revisions": 3}
    )
    assert cfg.revisions == 3  # flag beats file
    assert cfg.pool.max_actors == 4  # override beats file
    assert cfg.sampling.temperature == 0.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.sampling.max_new_tokens == 12
    assert cfg.engine.model == "smollm2"


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.max_new_token=3", "did you mean 'max_new_tokens'"),
        ("revisons=3", "did you mean 'revisions'"),
        ("revisions=abc", "expects int"),
        ("revisions=2.5", "expects int"),
        ("critique=1", "expects bool"),
        ("sampling=3", "must be a mapping"),
        ("pool.max_actors=0", "max_actors"),
        ("sampling.top_p=1.5", "top_p"),
        ("engine.backend=tpu", "backend"),
        ("engine.dtype=int8", "dtype"),
        ("revisions", "expected key=value"),
    ],
)
def test_bad_keys_and_values_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GenerateConfig, None, BASE + [override])


def test_required_fields():
    with pytest.raises(ConfigError, match="input"):
        load_config(GenerateConfig, None, ["output=o"])


def test_vllm_needs_gpus_per_actor():
    with pytest.raises(ConfigError, match="gpus_per_actor"):
        load_config(
            GenerateConfig,
            None,
            BASE + ["engine.backend=vllm", "engine.tensor_parallel_size=2", "pool.gpus_per_actor=1"],
        )
    cfg = load_config(
        GenerateConfig, None, BASE + ["engine.backend=vllm", "engine.tensor_parallel_size=2", "pool.gpus_per_actor=2"]
    )
    assert cfg.engine.engine_kwargs()["tensor_parallel_size"] == 2


def test_every_key_has_help():
    for key, _, help_text in describe(GenerateConfig):
        assert help_text, key


def test_a_partial_section_keeps_the_sections_own_defaults():
    """LabelConfig.policy defaults to model '' (no policy); setting policy.dtype alone
    must not turn the policy on with EngineConfig's default model."""
    from cai_ray.config import load_config
    from cai_ray.label.config import LabelConfig

    cfg = load_config(LabelConfig, None, ["input=x", "output=y", "policy.dtype=float32", "sampling.max_new_tokens=8"])
    assert cfg.policy.model == "" and cfg.policy.dtype == "float32" and not cfg.samples_answers
    assert cfg.sampling.temperature == 1.0 and cfg.sampling.max_new_tokens == 8


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_bundled_job_config_validates(path):
    from support.configs import CONFIGS

    from cai_ray import config

    classes = {**CONFIGS, "demo": CONFIGS["pipeline"]}
    cfg = config.load_config(classes[path.stem.split("_")[0]], path)
    assert (
        getattr(cfg, "input", None)
        or getattr(cfg, "data", None)
        or getattr(cfg, "prompts", None)
        or getattr(cfg, "models", None)
        or getattr(cfg, "generator", None)  # classifiers: the constitution and the model that writes from it
        or cfg.policy.model
    )


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    from cai_ray.train.config import SFTTrainConfig

    f = tmp_path / "c.yaml"
    f.write_text("data: d\noutput: o\noptim:\n  learning_rate: 5e-6\n")
    assert load_config(SFTTrainConfig, f).optim.learning_rate == 5e-6
    assert load_config(SFTTrainConfig, f, ["optim.learning_rate=3e-3"]).optim.learning_rate == 3e-3
