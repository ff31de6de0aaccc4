"""Training on Ray Train with DeepSpeed: SFT, preference model, DPO, RL (PPO/GRPO/RLOO) (see harness.py)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# trainer → (its config class in cai_ray.config, "module:function" that runs it)
TRAINERS = {
    "sft": ("SFTTrainConfig", "cai_ray.train.sft:train_sft"),
    "rm": ("RMTrainConfig", "cai_ray.train.rm:train_rm"),
    "dpo": ("DPOTrainConfig", "cai_ray.train.dpo:train_dpo"),
    "ppo": ("RLTrainConfig", "cai_ray.train.ppo:train_rl"),
}


def trainer(kind: str) -> tuple[type, Callable[[Any], dict]]:
    """(config class, job function) of trainer ``kind``; the job's heavy imports happen here."""
    from cai_ray import config

    cls_name, target = TRAINERS[kind]
    module, fn = target.split(":")
    return getattr(config, cls_name), getattr(importlib.import_module(module), fn)
