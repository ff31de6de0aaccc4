"""The arithmetic of evaluation, pure and tested: judge probabilities, rates, agreement, Elo.

Elo ratings here are a Bradley–Terry fit to all games at once (the method Chatbot Arena
uses), on the Elo scale: a rating gap of ``400·log10(odds)``, so a model that wins 75% of
its games against another stands 400·log10(3) ≈ 190.8 above it. Unlike the sequential Elo
update the result does not depend on the order the games are played in. A game's score may
be soft (the judge's debiased probability), which the fit takes as a fractional win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ELO_BASE = 1000.0
ELO_SCALE = 400.0 / math.log(10.0)  # natural-log strength → Elo points


def judged_yes(p_first: float, p_second: float) -> float:
    """P("yes") from a yes/no question asked in both option orders: ``p_first`` is P(option A)
    with "yes" as (A), ``p_second`` is P(option A) with "no" as (A)."""
    return (p_first + (1.0 - p_second)) / 2.0


def mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def share_above(ps: Sequence[float | None], threshold: float = 0.5) -> float | None:
    """Share of probabilities above ``threshold`` (the hard decision), Nones excluded."""
    xs = [p for p in ps if p is not None]
    return sum(p > threshold for p in xs) / len(xs) if xs else None


def agreement(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | None]:
    """How often two detectors agree, and Cohen's kappa (agreement beyond chance)."""
    if len(a) != len(b):
        raise ValueError(f"agreement of {len(a)} and {len(b)} decisions")
    n = len(a)
    if not n:
        return {"agreement": None, "kappa": None, "n": 0}
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    kappa = None if chance >= 1.0 else (observed - chance) / (1.0 - chance)
    return {"agreement": observed, "kappa": kappa, "n": n}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def elo_ratings(
    players: Sequence[str],
    games: Sequence[tuple[str, str, float]],
    *,
    anchor: str | None = None,
    base: float = ELO_BASE,
    reg: float = 1e-3,
    iters: int = 100,
) -> dict[str, float]:
    """Elo-scale Bradley–Terry ratings from ``games`` = (player a, player b, score of a in
    [0, 1]). ``anchor`` is pinned to ``base`` (default: the ratings average ``base``). A small
    ridge ``reg`` keeps ratings finite when one player wins every game outright. Players with
    no game keep ``base``. Newton's method on the concave log-likelihood."""
    import numpy as np

    idx = {p: i for i, p in enumerate(players)}
    if len(idx) != len(players):
        raise ValueError("elo_ratings: duplicate player names")
    for a, b, s in games:
        if a not in idx or b not in idx:
            raise ValueError(f"elo_ratings: game between unknown players {a!r} and {b!r}")
        if a == b:
            raise ValueError(f"elo_ratings: {a!r} plays itself")
        if not 0.0 <= s <= 1.0 or math.isnan(s):
            raise ValueError(f"elo_ratings: score {s!r} outside [0, 1]")
    n = len(players)
    theta = np.zeros(n)
    for _ in range(iters):
        grad = -reg * theta
        hess = -reg * np.eye(n)
        for a, b, s in games:
            i, j = idx[a], idx[b]
            p = _sigmoid(theta[i] - theta[j])
            g, h = s - p, p * (1.0 - p)
            grad[i] += g
            grad[j] -= g
            hess[i, i] -= h
            hess[j, j] -= h
            hess[i, j] += h
            hess[j, i] += h
        hess -= 1e-12 * np.eye(n)  # players with no games (and reg=0) keep a solvable system
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    ratings = ELO_SCALE * theta
    shift = ratings[idx[anchor]] if anchor is not None else float(ratings.mean())
    return {p: float(base + ratings[i] - shift) for p, i in idx.items()}


def expected_score(rating_a: float, rating_b: float) -> float:
    """The Elo expectation of a against b."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))
