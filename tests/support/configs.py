"""Every command's config class, by the name users know it under (its config file prefix)."""

from cai_ray.classifiers.config import ClassifiersConfig
from cai_ray.eval.config import EvalConfig
from cai_ray.generate.config import GenerateConfig
from cai_ray.label.config import LabelConfig
from cai_ray.pipeline.config import PipelineConfig
from cai_ray.serve.config import ServeConfig
from cai_ray.train.config import DPOTrainConfig, RMTrainConfig, SFTTrainConfig
from cai_ray.train.ppo.config import RLTrainConfig

CONFIGS = {
    "generate": GenerateConfig,
    "label": LabelConfig,
    "sft": SFTTrainConfig,
    "rm": RMTrainConfig,
    "dpo": DPOTrainConfig,
    "ppo": RLTrainConfig,
    "serve": ServeConfig,
    "eval": EvalConfig,
    "pipeline": PipelineConfig,
    "classifiers": ClassifiersConfig,
}
