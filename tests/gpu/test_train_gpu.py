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
    c = {
        "kind": kind,
        "rows": rows,
        "model": "tiny-random",
        "use_gpu": True,
        "zero": 3,
        "offload": False,
        "seed": 0,
        "every_steps": 100,
        "keep": 1,
        "epochs": 1.0,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "per_worker_batch_size": 4,
        "grad_accum": 1,
        "max_length": 128,
        "warmup_ratio": 0.0,
        "dtype": "bfloat16",
        "lora": {"enabled": False},
        "soft": True,
        "beta": 0.1,
        "loss_type": "sigmoid",
        "label_smoothing": 0.0,
        "rank": 0,
    }
    trainer = module.build(c, tmp_path)
    result = trainer.train()
    assert trainer.state.global_step == 2 and result.training_loss > 0
    assert trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3
    assert next(trainer.model_wrapped.parameters()).device.type == "cuda"
    assert torch.cuda.max_memory_allocated() > 0
