"""The reward of the GPU PPO test (reward.function=tests/gpu/rewards_gpu.py:on_nccl)."""


def on_nccl(prompts, responses):
    """tests/data/rewards.py's by_length, and a check of where it runs: on a Ray Train worker
    whose process group is NCCL on a CUDA device. A run on gloo or on the CPU fails here."""
    import torch
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    if backend != "nccl" or not torch.cuda.is_available():
        raise RuntimeError(f"the PPO worker runs on backend {backend}, CUDA {torch.cuda.is_available()}: want nccl")
    return [float(len(r)) / 10 for r in responses]
