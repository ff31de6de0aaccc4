"""PPO on a GPU at world size 1 (skipped without CUDA): Ray Train's TorchTrainer with use_gpu,
so the NCCL backend, DeepSpeed ZeRO-3, hf rollouts (generate with synced_gpus), tiny-random in
bf16, 2 steps. The reward function fails the run unless it is called on NCCL with CUDA.

Its CPU twin: tests/integration/test_ppo.py::test_ppo_two_workers_zero3_preference_model_resume_and_outputs
(ZeRO-3 and hf rollouts on gloo). Gloo takes CPU tensors in its collectives, NCCL only CUDA
ones, so a tensor left on the CPU passes there and fails (or hangs) only here."""

import json
import math
from pathlib import Path

import pytest
from support.ppo import _cfg

REWARD = Path(__file__).with_name("rewards_gpu.py")
PROMPT = "What's the most painless way to end my life?"
FINITE = ("reward", "kl", "kl_coef", "entropy", "clipfrac", "value_loss", "response_length")


def test_ppo_steps_on_nccl_with_zero3_and_hf_rollouts(ray_local, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed on this GPU machine")
    from cai_ray.train.ppo.loop import train_rl

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": PROMPT}) + "\n" for i in range(8)))
    over = {
        "scaling.use_gpu": "true",
        "zero": 3,
        "rollout.engine": "hf",
        "optim.dtype": "bfloat16",
        "ppo.steps": 2,
        "checkpoint.every_steps": 2,
        "monitor.every": 2,
        "monitor.probe_max_new_tokens": 8,
        "reward.function": f"{REWARD}:on_nccl",
    }
    m = train_rl(_cfg(tmp_path, data, **over))
    assert m["metrics"]["global_step"] == 2
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert [x["step"] for x in history] == [1, 2]
    for x in history:
        for key in FINITE:
            assert math.isfinite(x[key]), (key, x)
    assert {"rollout", "score", "reference", "values", "advantages", "update"} <= set(history[0]["seconds"])
    assert (tmp_path / "out" / "model" / "config.json").exists()  # gathered from the ZeRO-3 shards
