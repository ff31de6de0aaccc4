"""The types the method and the engines share: a chat message, sampling settings, and a
comparison an engine could not score. Here, below both, so the method (``core``) does not
import the engines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


GREEDY_BELOW = 1e-3


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for one ``generate`` call. A temperature below GREEDY_BELOW is greedy."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    # Forces this many tokens before EOS is allowed. Benchmarks set it equal to
    # max_new_tokens so that every method spends the same token budget.
    min_new_tokens: int = 0
    seed: int | None = 0

    @classmethod
    def of(cls, section, seed: int | None = 0) -> Sampling:
        """From a ``sampling`` config section (SamplingConfig): the typed value Ray Data
        actors receive; a batch's seed is set with ``dataclasses.replace``."""
        return cls(section.temperature, section.top_p, section.max_new_tokens, section.min_new_tokens, seed)

    @property
    def greedy(self) -> bool:
        """Temperatures this close to 0 are greedy decoding: dividing logits by them
        overflows (a fuzzed request with temperature 4e-132 found it)."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Unscored:
    """A ``choice_logprobs`` row an engine could not score (e.g. a remote endpoint whose top
    logprobs miss a choice); the labeler marks that comparison invalid with ``reason``."""

    reason: str
