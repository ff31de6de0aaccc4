"""Configs: the strict loader (``loader.py``) and the sections several steps share
(``sections.py``). Each step's own config class sits beside the step, in its package's
``config.py`` (``cai_ray.generate.config.GenerateConfig``, ...)."""

from __future__ import annotations

from cai_ray.config.loader import (
    ConfigError,
    apply_override,
    check_job_paths,
    describe,
    from_dict,
    load_config,
    positive,
    setting,
    submitted_job,
    to_dict,
)
from cai_ray.config.sections import (
    EngineConfig,
    InputConfig,
    LabelerConfig,
    OutputConfig,
    PoolConfig,
    SamplingConfig,
)

__all__ = [
    "ConfigError",
    "EngineConfig",
    "InputConfig",
    "LabelerConfig",
    "OutputConfig",
    "PoolConfig",
    "SamplingConfig",
    "apply_override",
    "check_job_paths",
    "describe",
    "from_dict",
    "load_config",
    "positive",
    "setting",
    "submitted_job",
    "to_dict",
]

# the step configs' old home (this was one 1,200-line module): kept for one release
MOVED = {
    "GenerateConfig": "cai_ray.generate.config",
    "PairsConfig": "cai_ray.label.config",
    "FilterConfig": "cai_ray.label.config",
    "LabelConfig": "cai_ray.label.config",
    "ScalingSection": "cai_ray.train.config",
    "OptimSection": "cai_ray.train.config",
    "CheckpointSection": "cai_ray.train.config",
    "LoraSection": "cai_ray.train.config",
    "TrainConfig": "cai_ray.train.config",
    "SFTTrainConfig": "cai_ray.train.config",
    "RMTrainConfig": "cai_ray.train.config",
    "DPOTrainConfig": "cai_ray.train.config",
    "RLTrainConfig": "cai_ray.train.ppo.config",
    "RewardSection": "cai_ray.train.ppo.config",
    "RolloutSection": "cai_ray.train.ppo.config",
    "PPOSection": "cai_ray.train.ppo.config",
    "MonitorSection": "cai_ray.train.ppo.config",
    "ServeConfig": "cai_ray.serve.config",
    "ServeLimits": "cai_ray.serve.config",
    "ServeScaling": "cai_ray.serve.config",
    "EvalConfig": "cai_ray.eval.config",
    "parse_model_spec": "cai_ray.eval.config",
    "PipelineConfig": "cai_ray.pipeline.config",
}


def __getattr__(name: str):
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(
        f"cai_ray.config.{name} is now {MOVED[name]}.{name}; the old name will be removed in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(MOVED[name]), name)
