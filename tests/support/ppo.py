"""What the unit and the integration tests of ppo share."""

from pathlib import Path

from cai_ray.config import load_config
from cai_ray.train.ppo.config import RLTrainConfig

REWARDS = Path(__file__).resolve().parents[1] / "data" / "rewards.py"


# the settings every test's config starts from (besides data and output)
BASE = {
    "model": "tiny-random",
    "scaling.workers": 1,
    "scaling.cpus_per_worker": 1.0,
    "ppo.steps": 3,
    "ppo.rollout_batch": 4,
    "rollout.max_new_tokens": 4,
    "optim.per_worker_batch_size": 4,
    "checkpoint.every_steps": 2,
    "monitor.every": 2,
    "reward.function": f"{REWARDS}:prefer_ugs",
}


def _cfg(tmp_path, data, **over):
    base = {"data": data, "output": tmp_path / "out", **BASE}
    base.update(over)
    return load_config(RLTrainConfig, None, [f"{k}={v}" for k, v in base.items() if v is not None])
