"""One DeepSpeed ZeRO-3 step of each trainer on a GPU (skipped without CUDA): the trainer
Ray Train's workers build, in a single process (world size 1)."""

import os

import pytest

PROMPT = [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("kind", ["sft", "rm", "dpo"])
def test_one_zero3_step_on_gpu(tmp_path, monkeypatch, kind):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed on this GPU machine")
    import importlib

    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    module = importlib.import_module(f"cai_ray.train.{kind}")
    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }.items():
        monkeypatch.setenv(k, v)
    if kind == "sft":
        rows = [{"prompt": PROMPT, "completion": [{"role": "assistant", "content": f"answer {i}"}]} for i in range(8)]
    else:
        rows = [
            {
                "prompt": PROMPT,
                "chosen": [{"role": "assistant", "content": f"good {i}"}],
                "rejected": [{"role": "assistant", "content": f"bad bad {i}"}],
                "p_chosen": 0.8,
            }
            for i in range(8)
        ]
    from support.configs import CONFIGS

    from cai_ray.config import load_config
    from cai_ray.train.harness import WorkerJob

    cfg = load_config(
        CONFIGS[kind],
        None,
        [
            "data=unused.jsonl",
            f"output={tmp_path}",
            "model=tiny-random",
            "zero=3",
            "optim.max_steps=2",
            "optim.learning_rate=0.001",
            "optim.max_length=128",
            "optim.dtype=bfloat16",
            "checkpoint.every_steps=100",
            "checkpoint.keep=1",
        ],
    )
    extra = module.HeldOut(soft=True, eval_rows=()) if kind == "rm" else None
    job = WorkerJob(kind, cfg, tuple(rows), str(tmp_path), use_gpu=True, extra=extra)
    trainer = module.build(job, tmp_path)
    result = trainer.train()
    assert trainer.state.global_step == 2 and result.training_loss > 0
    assert trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3
    assert next(trainer.model_wrapped.parameters()).device.type == "cuda"
    assert torch.cuda.max_memory_allocated() > 0
