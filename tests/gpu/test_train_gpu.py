"""One DeepSpeed ZeRO-3 SFT step on a GPU (skipped without CUDA): the trainer Ray Train's
workers run, in a single process (world size 1)."""

import os

import pytest


def test_one_zero3_sft_step_on_gpu(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed on this GPU machine")
    import torch

    from cai_ray.train.sft import make_trainer

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(k, v)
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}],
             "completion": [{"role": "assistant", "content": f"answer {i}"}]} for i in range(8)]
    c = {"rows": rows, "model": "tiny-random", "use_gpu": True, "zero": 3, "offload": False, "seed": 0,
         "every_steps": 100, "keep": 1, "epochs": 1.0, "max_steps": 2, "learning_rate": 1e-3,
         "per_worker_batch_size": 4, "grad_accum": 1, "max_length": 128, "warmup_ratio": 0.0, "dtype": "bfloat16"}
    trainer = make_trainer(c, tmp_path)
    result = trainer.train()
    assert trainer.state.global_step == 2 and result.training_loss > 0
    assert trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3
    assert next(trainer.model_wrapped.parameters()).device.type == "cuda"
    assert torch.cuda.max_memory_allocated() > 0
