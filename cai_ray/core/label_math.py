"""The arithmetic of RL-CAI preference labels (CAI and RLAIF papers), pure and tested.

Conventions: ``response_a`` / ``response_b`` are the pair as stored; a comparison is shown
to the labeler in one of two orders. In order AB, ``response_a`` is option (A); in order BA,
``response_a`` is option (B). Every probability below is "P(response_a is better)".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def sigmoid(x: float) -> float:
    """σ(x) without overflow for any finite x (math.exp(-x) overflows below x = -709)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def soft_label(logprob_a: float, logprob_b: float) -> float:
    """P(option A) normalised over the two options, from their log-probabilities."""
    top = max(logprob_a, logprob_b)
    ea, eb = math.exp(logprob_a - top), math.exp(logprob_b - top)
    return ea / (ea + eb)


def debias(p_first_order: float, p_second_order: float) -> tuple[float, bool]:
    """Average the two presentation orders (both already "P(response_a is better)").

    Returns (p, position_consistent): consistent when both orders prefer the same response.
    A labeler that always picks whichever answer comes first gives p_ab≈1, p_ba≈0 → 0.5 and
    inconsistent, which is exactly the signal the RLAIF paper uses to drop such labels.
    """
    p = (p_first_order + p_second_order) / 2
    consistent = (p_first_order - 0.5) * (p_second_order - 0.5) > 0
    return p, consistent


def from_swapped(p_option_a_when_swapped: float) -> float:
    """In order BA, response_a is option (B): P(response_a) = 1 - P(option A)."""
    return 1.0 - p_option_a_when_swapped


def ensemble(ps: Sequence[float]) -> float:
    """Mean over principles (the CAI paper's ensembling over constitutional principles)."""
    if not ps:
        raise ValueError("ensemble of no labels")
    return sum(ps) / len(ps)


def clamp(p: float, lo: float = 0.4, hi: float = 0.6) -> float:
    """Chain-of-thought labels are overconfident; the CAI paper clamps them to [0.4, 0.6]."""
    if not 0 <= lo <= 0.5 <= hi <= 1:
        raise ValueError(f"clamp range must satisfy 0 <= lo <= 0.5 <= hi <= 1, got ({lo}, {hi})")
    return min(hi, max(lo, p))


_CHOICE = re.compile(r"\(\s*([AB])\s*\)|\b(?:answer|option|response)\s*(?:is|:)?\s*\(?([AB])\b", re.I)


def parse_choice(text: str) -> tuple[str | None, str | None]:
    """Resolve a chain-of-thought output to 'A' or 'B', or (None, reason). Never guesses:
    no mention, or mentions of both options with no final answer, is invalid."""
    if not text or not text.strip():
        return None, "empty labeler output"
    final = re.findall(r"answer is:?\s*\(?\s*([AB])\b", text, re.I)
    if final:
        picks = {x.upper() for x in final}
        if len(picks) == 1:
            return picks.pop(), None
        return None, "labeler output gives both (A) and (B) as the answer"
    picks = {(m.group(1) or m.group(2)).upper() for m in _CHOICE.finditer(text)}
    if len(picks) == 1:
        return picks.pop(), None
    if not picks:
        return None, "labeler output names neither (A) nor (B)"
    return None, "labeler output names both (A) and (B) without a final answer"


def expected_calibration_error(probs: Sequence[float], outcomes: Sequence[int], bins: int = 10) -> float:
    """ECE of binary predictions: ``probs`` = P(outcome == 1), weighted by bin size."""
    if len(probs) != len(outcomes):
        raise ValueError("probs and outcomes differ in length")
    if not probs:
        return 0.0
    total, n = 0.0, len(probs)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            conf = sum(probs[i] for i in idx) / len(idx)
            acc = sum(outcomes[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(conf - acc)
    return total
