"""Reductions across PPO's Ray Train workers: sums, means, the spread of the scores, whitening
with every rank's statistics, gathering small lists. One rank: nothing is handed to a collective."""

from __future__ import annotations

import math


def collective_device(own):
    """Where a tensor handed to a collective must live: NCCL (Ray Train's backend on GPUs)
    takes GPU tensors only and refuses CPU ones at the first reduction; gloo (CPU) takes CPU
    tensors. ``own`` is this rank's training device."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(own)
    return torch.device("cpu")


class Ranks:
    def __init__(self, rank: int, world: int, device):
        self.rank, self.world, self.device = rank, world, device

    def all_sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=collective_device(self.device))
        dist.all_reduce(t)
        return t.cpu().tolist()

    def mean(self, x: float) -> float:
        return self.all_sum([x])[0] / self.world

    def sum(self, x: float) -> float:
        return self.all_sum([x])[0]

    def max(self, x: float) -> float:
        return max(self.gather([x]))

    def barrier(self) -> None:
        self.all_sum([0.0])

    def std(self, scores) -> float:
        n, s, s2 = self.all_sum([scores.numel(), scores.sum().item(), (scores**2).sum().item()])
        return math.sqrt(max(s2 / n - (s / n) ** 2, 0.0))

    def whiten(self, adv, mask):
        """(A - mean) / std with the statistics of every worker's tokens."""
        n, s, s2 = self.all_sum([mask.sum().item(), (adv * mask).sum().item(), (adv**2 * mask).sum().item()])
        mean = s / n
        var = max(s2 / n - mean**2, 0.0) * n / max(n - 1, 1)
        return (adv - mean) / math.sqrt(var + 1e-8) * mask

    def gather(self, items: list) -> list:
        import torch.distributed as dist

        if self.world == 1:
            return list(items)
        out: list = [None] * self.world
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
