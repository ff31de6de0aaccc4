"""What the unit and the integration tests of pipeline share."""

from pathlib import Path

from cai_ray.config import load_config
from cai_ray.pipeline.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]


DEMO = ROOT / "jobs" / "configs" / "demo.yaml"


# the demo config made tiny: tiny-random everywhere, a few tokens, one or two steps
TINY = [
    "model=tiny-random",
    "generate.engine.dtype=float32",
    "generate.sampling.max_new_tokens=8",
    "generate.pool.cpus_per_actor=0.5",
    "sft.optim.epochs=1.0",
    "sft.optim.max_length=256",
    "label.sampling.max_new_tokens=8",
    "label.policy.dtype=float32",
    "label.labeler.dtype=float32",
    "label.policy_pool.cpus_per_actor=0.25",
    "label.labeler_pool.cpus_per_actor=0.5",
    "rm.optim.epochs=1.0",
    "rm.optim.max_length=256",
    "ppo.optim.max_length=256",
    "ppo.rollout.max_new_tokens=4",
    "ppo.ppo.steps=1",
    "ppo.ppo.rollout_batch=4",
    "ppo.monitor.every=1",
    "ppo.monitor.probe_max_new_tokens=4",
    "dpo.optim.max_length=256",
    "eval.limit=2",
    "eval.engine.dtype=float32",
    "eval.judge.dtype=float32",
    "eval.sampling.max_new_tokens=8",
    "eval.cpus_per_engine=0.5",
    "eval.per_principle=false",  # the principle table is test_eval.py's; here it only costs time
]


def _load(tmp_path, *over):
    return load_config(PipelineConfig, DEMO, [f"output={tmp_path / 'run'}", *TINY, *over])
