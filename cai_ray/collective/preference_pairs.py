"""Preference pairs for `constitution derive`: read, split, and grouped by what tells them apart.

Input rows (JSONL, CSV, Parquet, or a label run's folder): ``prompt`` (string or messages) or
``messages``, ``chosen`` and ``rejected`` (strings or one assistant message each), or the
label step's output (``chosen``/``rejected`` full conversations). Output: ``Pair`` values,
and a reject ``{source, line, id, reason, raw}`` for every row that cannot be one.

    read      batch.readers.read_records + ``pair_row``, ids by the readers' rule; a repeated
              id is a reject (it would sit on both sides of the split)
    split     held-out by a hash of (seed, pair id): a pair's side does not depend on file order
    features  per pair, which words the chosen reply has and the rejected one has not (+1) or
              the other way round (-1), over the words of at least ``min_pairs`` training pairs
    cluster   the features projected on their top principal components, k-means (the one of
              ``opinion_groups``), clusters numbered largest first
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from cai_ray.batch.readers import (
    Reject,
    Row,
    RowsError,
    conversation_id,
    given_id,
    pref_row,
    read_records,
    reject,
)
from cai_ray.batch.records import reasons_count
from cai_ray.collective.opinion_groups import _by_size, kmeans

WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: list[dict]  # messages, ending with a user turn
    chosen: str
    rejected: str


def pair_row(r: Row) -> tuple[Row | None, str | None]:
    """One preference row → {"prompt": messages, "chosen": text, "rejected": text} or a reason:
    the trainers' rule (``batch.readers.pref_row``), with ``messages`` accepted for ``prompt``."""
    if r.get("messages") is not None:
        if r.get("prompt") is not None:
            return None, "row has both 'prompt' and 'messages'; keep one"
        r = {**r, "prompt": r["messages"]}
    row, why = pref_row(r)
    if row is None:
        return None, why
    return {
        "prompt": row["prompt"],
        "chosen": row["chosen"][0]["content"],
        "rejected": row["rejected"][0]["content"],
    }, None


def read_pairs(path: str) -> tuple[list[Pair], list[Reject]]:
    """Every row of ``path`` as a Pair or a reject (never both, never neither). A row's id is
    its own ``id``, else the hash of its conversations: the id the trainers give it too.
    Raises batch.readers.RowsError for a missing file or one without a usable row."""
    pairs, rejects, seen = [], [], set()
    for source, line, rec in read_records(path)[0]:
        row, why = (None, rec["_invalid"]) if "_invalid" in rec else pair_row(rec)
        if row is not None:
            rid, why = given_id(rec.get("id"))
            answers = [[{"role": "assistant", "content": row[k]}] for k in ("chosen", "rejected")]
            rid = rid or conversation_id(row["prompt"], *answers)
            if why is None and rid in seen:
                why = f"repeated id {rid!r} (its first row is used)"
        if why is not None:
            rejects.append(reject(source, line, rec, why))
            continue
        seen.add(rid)
        pairs.append(Pair(rid, row["prompt"], row["chosen"], row["rejected"]))
    if not pairs:
        raise RowsError(f"{path}: no usable rows ({reasons_count(rejects) or 'empty'})")
    return pairs, rejects


def split_held_out(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training ids, held-out ids), both in input order. The ``round(len * fraction)`` ids
    with the smallest hash of (seed, id) are held out, at least one on each side."""
    if len(ids) < 2:
        raise ValueError(f"need at least 2 pairs to hold some out, got {len(ids)}")
    n_held = min(max(round(len(ids) * fraction), 1), len(ids) - 1)

    def key(pid: str) -> bytes:
        return hashlib.blake2b(f"{seed}\x00{pid}".encode(), digest_size=8).digest()

    held = set(sorted(ids, key=key)[:n_held])
    return [i for i in ids if i not in held], [i for i in ids if i in held]


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def difference_features(pairs: list[Pair], min_pairs: int = 2, max_words: int = 2000) -> tuple[np.ndarray, list[str]]:
    """(pairs, words) with +1 where only the chosen reply has the word, -1 where only the
    rejected one has it, and the vocabulary: the ``max_words`` words that tell the two replies
    apart in the most pairs, each in at least ``min_pairs`` pairs (ties: alphabetical)."""
    diffs = [(words(p.chosen) - words(p.rejected), words(p.rejected) - words(p.chosen)) for p in pairs]
    counts = Counter(w for plus, minus in diffs for w in plus | minus)
    vocab = sorted((w for w, n in counts.items() if n >= min_pairs), key=lambda w: (-counts[w], w))[:max_words]
    col = {w: j for j, w in enumerate(vocab)}
    x = np.zeros((len(pairs), len(vocab)))
    for i, (plus, minus) in enumerate(diffs):
        for w in plus:
            if w in col:
                x[i, col[w]] = 1.0
        for w in minus:
            if w in col:
                x[i, col[w]] = -1.0
    return x, vocab


@dataclass(frozen=True)
class Clusters:
    labels: np.ndarray  # (pairs,) int, 0 the largest cluster
    k: int
    centres: np.ndarray  # (k, words): mean feature per cluster, in word space

    def members(self, j: int) -> list[int]:
        return np.flatnonzero(self.labels == j).tolist()


def cluster_pairs(x: np.ndarray, k: int, seed: int, components: int = 20) -> Clusters:
    """k-means of the rows of ``x`` (each scaled to unit length, then projected on their top
    ``components`` principal components, which keeps k-means' memory at pairs × k × components);
    k is lowered to the number of different rows. All one cluster when k is 1 or no word
    tells any two replies apart."""
    n = len(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    distinct = len(np.unique(unit.round(9), axis=0)) if n else 0
    k = max(1, min(k, distinct))
    if k == 1 or unit.shape[1] == 0:
        labels = np.zeros(n, dtype=int)
    else:
        centred = unit - unit.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points = centred @ vt[: min(components, vt.shape[0])].T
        labels, _ = kmeans(points, k, np.random.default_rng([seed, k]))
        labels = _by_size(labels)
        k = int(labels.max()) + 1
    centres = np.array([x[labels == j].mean(0) for j in range(k)]) if n else np.zeros((0, x.shape[1]))
    return Clusters(labels, k, centres)


def top_words(centre: np.ndarray, vocab: list[str], n: int = 5, least: float = 0.25) -> tuple[list[str], list[str]]:
    """The words a cluster's chosen replies have more (then: its rejected replies have more),
    by mean feature, strongest first; only words at ``least`` or beyond."""
    order = np.argsort(-centre, kind="stable")
    more = [vocab[j] for j in order if centre[j] >= least][:n]
    less = [vocab[j] for j in order[::-1] if centre[j] <= -least][:n]
    return more, less
