"""Group-aware consensus (Polis): a statement counts as agreed only if every group agrees.

Per statement s and group g, over the group's voters who voted on s:

    P_g(s)    = (agree_g + 1) / (votes_g + 2)     agree probability, Laplace prior (a pass
                                                  is a vote that is not an agreement)
    consensus = Π_g P_g(s)                        high only when no group is against it

A statement is kept when P_g >= min_agree and votes_g >= min_group_votes in *every* group;
the kept ones are ranked by consensus (ties: file order). A big group cannot outvote a small
one: each group is one factor, whatever its size. Pure numpy, no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Support:
    """Counts and scores, each (groups, statements) but ``consensus`` (statements,)."""

    agree: np.ndarray
    disagree: np.ndarray
    passed: np.ndarray
    votes: np.ndarray
    p_agree: np.ndarray
    consensus: np.ndarray


def group_support(votes: np.ndarray, mask: np.ndarray, labels: np.ndarray, k: int) -> Support:
    """``votes``/``mask`` (voters, statements) as in opinion_groups; ``labels`` (voters,)."""
    member = np.eye(k)[labels].T  # (groups, voters)
    voted = mask.astype(float)
    agree = member @ (voted * (votes == 1))
    disagree = member @ (voted * (votes == -1))
    passed = member @ (voted * (votes == 0))
    n = member @ voted
    p = (agree + 1) / (n + 2)
    return Support(agree.astype(int), disagree.astype(int), passed.astype(int), n.astype(int), p, p.prod(0))


def select(support: Support, min_agree: float, min_group_votes: int, max_principles: int) -> list[int]:
    """Indices of the statements every group agreed with, best consensus first."""
    ok = (support.p_agree >= min_agree).all(0) & (support.votes >= min_group_votes).all(0)
    kept = sorted(np.flatnonzero(ok), key=lambda s: (-support.consensus[s], s))
    return [int(s) for s in kept[:max_principles]]
