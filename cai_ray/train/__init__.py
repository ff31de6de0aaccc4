"""Training on Ray Train with DeepSpeed: SFT, preference model, DPO, RL (PPO/GRPO/RLOO), constitutional classifiers (see harness.py)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# trainer → ("module:class" of its config, "module:function" that runs it)
TRAINERS = {
    "sft": ("cai_ray.train.config:SFTTrainConfig", "cai_ray.train.sft:train_sft"),
    "rm": ("cai_ray.train.config:RMTrainConfig", "cai_ray.train.rm:train_rm"),
    "dpo": ("cai_ray.train.config:DPOTrainConfig", "cai_ray.train.dpo:train_dpo"),
    "ppo": ("cai_ray.train.ppo.config:RLTrainConfig", "cai_ray.train.ppo.loop:train_rl"),
    "classifier": ("cai_ray.train.config:ClassifierTrainConfig", "cai_ray.train.classifier:train_classifier"),
}


def trainer(kind: str) -> tuple[type, Callable[[Any], dict]]:
    """(config class, job function) of trainer ``kind``; the job's heavy imports happen here."""
    return tuple(_load(target) for target in TRAINERS[kind])


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
