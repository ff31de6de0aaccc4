"""Benchmark-only engine: no model, answers instantly with canned text.

It exists so ``jobs/bench/sl_throughput.py`` can time the orchestration alone (read →
validate/id → prompt building → write). It must never stand in for a real engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from cai_ray.engine import Message, Sampling


class NoopEngine:
    context_length = 1 << 20

    def __init__(self, model: str = "noop", **_ignored):
        self.model_name = "noop"
        self.tokens_generated = 0

    def generate(self, convs: list[list[Message]], params: Sampling) -> list[str]:
        return ["noop response"] * len(convs)

    def choice_logprobs(self, convs, choices: Sequence[str]) -> list[list[float]]:
        import math

        return [[-math.log(len(choices))] * len(choices) for _ in convs]

    def token_counts(self, convs: list[list[Message]]) -> list[int]:
        # ~4 characters a token; good enough for a benchmark that never hits the limit
        return [sum(len(m["content"]) for m in c) // 4 for c in convs]
