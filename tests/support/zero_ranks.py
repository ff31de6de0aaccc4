"""One rank of a plain-``python`` DeepSpeed job on gloo (no Ray), for the tests in
tests/integration/test_zero_cpu.py. Prints one JSON line with what the rank saw.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/support/zero_ranks.py MODE MODEL

MODE ``generate``: ZeRO-3 across the ranks; rank 0's answer ends at its first token (its EOS
is the token it greedily answers first), the others run to ``max_new_tokens`` — the case
that hangs without ``synced_gpus``. MODE ``offload``: one PPO-style update (our ds_config,
a torch AdamW) with optimizer offload at ZeRO-2 and ZeRO-3.
"""

import json
import os
import sys
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 8


def generate(path: str) -> dict:
    from cai_ray.train.ppo.rollout import generate_ids, synced_generation

    rank = dist.get_rank()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tok(f"Question {rank}: what is {rank * 7} plus one?", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the unpartitioned model's greedy answer, to pick each rank's EOS
        plain = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(prompt) :].tolist()
    eos = plain[0] if rank == 0 else next(t for t in range(3, 10_000) if t not in plain)
    engine, *_ = deepspeed.initialize(
        model=model,
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}},
    )
    out = generate_ids(
        engine.module,
        tok,
        [prompt],
        "cpu",
        max_new_tokens=NEW_TOKENS,
        synced=synced_generation(3),
        eos_token_id=eos,
    )[0]
    dist.barrier()
    return {"rank": rank, "ids": out, "plain": plain[: len(out)]}


def offload(path: str) -> dict:
    from cai_ray.train.harness import WorkerJob
    from cai_ray.train.ppo.learner import ds_config

    losses = {}
    for zero in (2, 3):
        cfg = SimpleNamespace(zero=zero, offload=True, optim=SimpleNamespace(dtype="float32"))
        job = WorkerJob("ppo", cfg, (), "/tmp/unused", False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=ds_config(job, 2, 1)
        )
        ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        first = None
        for _ in range(3):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            first = float(loss) if first is None else first
        losses[zero] = [first, float(loss)]
    return {"losses": losses}


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    result = generate(path) if mode == "generate" else offload(path)
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
    os._exit(0)
