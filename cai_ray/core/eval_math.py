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
    ia = np.array([idx[a] for a, _, _ in games], dtype=int)
    ib = np.array([idx[b] for _, b, _ in games], dtype=int)
    sc = np.array([s for _, _, s in games], dtype=float)
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh((theta[ia] - theta[ib]) / 2.0))  # σ, vectorised over the games
        g, h = sc - p, p * (1.0 - p)
        grad = -reg * theta
        np.add.at(grad, ia, g)
        np.add.at(grad, ib, -g)
        hess = -reg * np.eye(n)
        np.add.at(hess, (ia, ia), -h)
        np.add.at(hess, (ib, ib), -h)
        np.add.at(hess, (ia, ib), h)
        np.add.at(hess, (ib, ia), h)
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


# -- uncertainty -----------------------------------------------------------------------------
# Every rate is a mean over prompts, so the bootstrap resamples prompts (seeded: the same
# interval on every run). Paired comparisons resample the prompts both models answered.
BOOTSTRAP = 2000
LEVEL = 0.95


def bootstrap_ci(
    values: Sequence[float | None], n_boot: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (Nones left out); None when
    there is nothing to resample."""
    import numpy as np

    x = np.array([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (0, 1) with no trials."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def kappa_ci(
    a: Sequence[bool], b: Sequence[bool], n_boot: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0
) -> list[float] | None:
    """Bootstrap interval of Cohen's kappa between two detectors' decisions on the same items
    (resamples where kappa is undefined — one detector constant — are left out)."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"kappa_ci of {len(a)} and {len(b)} decisions")
    if not a:
        return None
    x, y = np.array(a, dtype=float), np.array(b, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    xs, ys = x[idx], y[idx]
    observed = (xs == ys).mean(axis=1)
    pa, pb = xs.mean(axis=1), ys.mean(axis=1)
    chance = pa * pb + (1 - pa) * (1 - pb)
    ok = chance < 1.0
    if not ok.any():
        return None
    kappas = (observed[ok] - chance[ok]) / (1.0 - chance[ok])
    lo, hi = np.quantile(kappas, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def cohen_kappa(a: Sequence, b: Sequence) -> float | None:
    """Cohen's kappa between two raters' labels of the same items, any categories: (observed
    agreement - chance agreement) / (1 - chance); None where chance agreement is 1 (both
    raters constant on the same category: agreement says nothing)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa of {len(a)} and {len(b)} labels")
    n = len(a)
    if not n:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    cats = set(a) | set(b)
    chance = sum((list(a).count(c) / n) * (list(b).count(c) / n) for c in cats)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def cohen_kappa_ci(
    a: Sequence, b: Sequence, n_boot: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0
) -> list[float] | None:
    """Percentile bootstrap interval of ``cohen_kappa`` over the items (resamples where kappa
    is undefined are left out)."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"cohen_kappa_ci of {len(a)} and {len(b)} labels")
    if not a:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    kappas = [k for row in idx if (k := cohen_kappa([a[i] for i in row], [b[i] for i in row])) is not None]
    if not kappas:
        return None
    lo, hi = np.quantile(kappas, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def paired_difference(
    a: Sequence[float], b: Sequence[float], n_boot: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0
) -> dict[str, float | bool | None]:
    """mean(a) - mean(b) over the same prompts (a[i], b[i] belong to prompt i): the
    difference, its bootstrap interval, and a two-sided p-value from a paired sign-flip
    permutation test (under "no difference" each prompt's difference is as likely negated).
    ``significant``: the interval excludes 0 *and* p < 1 - level. At small n the percentile
    bootstrap runs narrow (10 prompts, 3 of them different: the interval can exclude 0 while
    p = 0.25), so both must agree before a difference is called real."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired_difference of {len(a)} and {len(b)} values")
    d = np.array(a, dtype=float) - np.array(b, dtype=float)
    if d.size == 0:
        return {"diff": None, "ci": None, "p_value": None, "significant": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = (float(q) for q in np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2]))
    observed = abs(d.mean())
    flips = rng.choice([-1.0, 1.0], size=(n_boot, d.size))
    null = np.abs((flips * d).mean(axis=1))
    p = float((1 + np.sum(null >= observed - 1e-12)) / (n_boot + 1))
    significant = not lo <= 0.0 <= hi and p < 1 - level
    return {"diff": float(d.mean()), "ci": [lo, hi], "p_value": p, "significant": significant, "n": int(d.size)}


def elo_ci(
    players: Sequence[str],
    games_by_prompt: dict[str, list[tuple[str, str, float]]],
    anchor: str | None,
    n_boot: int = 200,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """Bootstrap interval of every player's Elo: the prompts are resampled and the ratings
    refitted (a prompt's games stay together)."""
    import numpy as np

    prompts = sorted(games_by_prompt)
    if not prompts:
        return {p: None for p in players}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {p: [] for p in players}
    for _ in range(n_boot):
        games = [g for i in rng.integers(0, len(prompts), len(prompts)) for g in games_by_prompt[prompts[i]]]
        for p, r in elo_ratings(players, games, anchor=anchor, iters=30).items():
            draws[p].append(r)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    return {p: [float(x) for x in np.quantile(v, q)] for p, v in draws.items()}
