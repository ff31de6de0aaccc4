"""Opinion groups from a vote matrix, as Polis finds them: PCA, then k-means, k by silhouette.

Input: ``votes`` (voters × statements) with 1 agree, -1 disagree, 0 pass, and ``mask`` (the
same shape) 1 where the voter voted. Output: one group label per voter, 0 for the largest
group. Pure numpy, seeded: the same matrix and seed give the same groups.

    centre     each statement's column minus its mean over the voters who voted on it; a
               missing vote becomes 0 after centring, i.e. the statement's mean (Polis)
    project    the top ``components`` right singular vectors of the centred matrix (SVD);
               a voter's point is scaled by sqrt(statements / their votes), Polis's fix for
               sparse voters, who would otherwise all sit near the centre
    k-means    k-means++ starts, ``restarts`` runs, the lowest within-group sum of squares
    choose k   the highest mean silhouette over k = 2..max_groups (ties: the smaller k)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Groups:
    labels: np.ndarray  # (voters,) int: 0 is the largest group
    k: int
    silhouettes: dict[int, float]  # mean silhouette of every k tried
    points: np.ndarray  # (voters, components): where each voter sits in the projection


def project(votes: np.ndarray, mask: np.ndarray, components: int = 2) -> np.ndarray:
    """(voters, statements) → (voters, components): centred and mean-imputed, then PCA."""
    votes, mask = votes.astype(float), mask.astype(float)
    counts = mask.sum(0)
    means = (votes * mask).sum(0) / np.maximum(counts, 1)
    centred = (votes - means) * mask
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:components].T
    per_voter = mask.sum(1)
    return points * np.sqrt(votes.shape[1] / np.maximum(per_voter, 1))[:, None]


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 10, iters: int = 100):
    """k-means with k-means++ starts; → (labels, within-group sum of squares) of the best run."""
    best: tuple[np.ndarray, float] | None = None
    for _ in range(restarts):
        centres = [points[rng.integers(len(points))]]
        for _ in range(1, k):
            d2 = ((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(1)
            p = d2 / d2.sum() if d2.sum() > 0 else None
            centres.append(points[rng.choice(len(points), p=p)])
        c = np.array(centres)
        labels = np.full(len(points), -1)
        for _ in range(iters):
            d2 = ((points[:, None, :] - c[None]) ** 2).sum(-1)
            new = d2.argmin(1)
            for j in range(k):
                if not (new == j).any():
                    # an empty group takes the point farthest from its centre
                    far = d2[np.arange(len(points)), new].argmax()
                    new[far] = j
            if (new == labels).all():
                break
            labels = new
            c = np.array([points[labels == j].mean(0) for j in range(k)])
        inertia = float(((points - c[labels]) ** 2).sum())
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    assert best is not None
    return best


def silhouette(points: np.ndarray, labels: np.ndarray, chunk: int = 512) -> float:
    """Mean silhouette, (b - a) / max(a, b) per point (0 for a group of one); distances a
    chunk of rows at a time, so ten thousand voters need 40 MB, not an 800 MB matrix."""
    k = labels.max() + 1
    sizes = np.bincount(labels, minlength=k).astype(float)
    onehot = np.eye(k)[labels]
    scores = np.empty(len(points))
    for s in range(0, len(points), chunk):
        block = points[s : s + chunk]
        d = np.sqrt(sum((block[:, c, None] - points[None, :, c]) ** 2 for c in range(points.shape[1])))
        sums = d @ onehot  # (rows, k): distance sums to every group
        own = labels[s : s + chunk]
        rows = np.arange(len(own))
        a = sums[rows, own] / np.maximum(sizes[own] - 1, 1)
        other = sums / sizes
        other[rows, own] = np.inf
        b = other.min(1)
        score = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
        scores[s : s + chunk] = np.where(sizes[own] > 1, score, 0.0)
    return float(scores.mean())


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel so that 0 is the largest group (ties: the group whose first voter comes first)."""
    groups = np.unique(labels)
    order = sorted(groups, key=lambda g: (-(labels == g).sum(), np.flatnonzero(labels == g)[0]))
    remap = {g: i for i, g in enumerate(order)}
    return np.array([remap[g] for g in labels])


def opinion_groups(
    votes: np.ndarray, mask: np.ndarray, max_groups: int = 5, seed: int = 0, components: int = 2
) -> Groups:
    points = project(votes, mask, components)
    distinct = len(np.unique(points.round(9), axis=0))
    silhouettes: dict[int, float] = {}
    best: tuple[float, int, np.ndarray] | None = None
    for k in range(2, max_groups + 1):
        if k >= distinct:  # k groups need more than k different points to compare
            break
        labels, _ = kmeans(points, k, np.random.default_rng([seed, k]))
        silhouettes[k] = round(silhouette(points, labels), 4)
        if best is None or silhouettes[k] > best[0]:
            best = (silhouettes[k], k, labels)
    if best is None:  # too few voters, or all alike: one group, consensus is plain agreement
        return Groups(np.zeros(len(points), dtype=int), 1, silhouettes, points)
    return Groups(_by_size(best[2]), best[1], silhouettes, points)
