"""DeepSpeed paths that only break across ranks or with offload, reproduced on CPU with plain
processes on gloo (no Ray): ZeRO-3 generation where one rank's answers end first, and PPO's
optimizer offload. What stays unverified: the same on NCCL with GPUs (tests/gpu)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cai_ray.runtime import free_port

RANKS = Path(__file__).resolve().parents[1] / "support" / "zero_ranks.py"


def run_ranks(mode: str, model: str, world: int, timeout: float) -> list[dict]:
    """Start ``world`` ranks; a rank still running after ``timeout`` s (a hang) fails the test."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(RANKS), mode, model], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    results, logs = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out.decode(errors="replace"))
            assert p.returncode == 0, logs[-1][-3000:]
            results += [json.loads(line[7:]) for line in logs[-1].splitlines() if line.startswith("RESULT ")]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"{mode}: a rank was still running after {timeout} s (ranks out of step)") from None
    finally:
        for p in procs:
            p.kill()
    return results


def test_zero3_generation_finishes_when_one_ranks_answers_end_first(tiny_model):
    """Rank 0's answer ends at its first token, rank 1's runs 8 tokens: with the ranks kept in
    step (``synced_gpus``) both finish, each with the answer the unpartitioned model gives.
    Without it rank 1 waits for rank 0's shards in an all-gather that never comes."""
    got = sorted(run_ranks("generate", tiny_model, 2, timeout=420), key=lambda r: r["rank"])
    assert [len(r["ids"]) for r in got] == [1, 8]
    assert all(r["ids"] == r["plain"] for r in got)


def test_ppo_optimizer_offload_takes_steps(tiny_model):
    """``offload: true`` with our torch AdamW: DeepSpeed takes it (it refused it before) at
    ZeRO-2 and ZeRO-3, and the loss goes down on a repeated batch."""
    (got,) = run_ranks("offload", tiny_model, 1, timeout=420)
    for zero, (first, last) in got["losses"].items():
        assert last < first, zero
