"""Constitutional classifiers without torch: what text a classifier reads, and how it is
measured. ``cai-ray classifiers`` trains the two classifiers on these texts; the serve guard
(``guard: classifier``) scores with the same texts, so training and serving cannot drift.

- the **input classifier** reads the conversation up to the human's last turn
  (``input_text``) and gives P(the request asks for something the constitution forbids);
- the **output classifier** reads the conversation and the answer so far
  (``output_text``) and gives P(the answer violates a principle). Streaming checks score a
  growing prefix of the answer, so it is trained on prefixes too.

Metrics are over scores and 0/1 labels: AUROC (the probability that a random positive
outscores a random negative, ties half) and the false-positive rate at a fixed recall, each
with a seeded bootstrap interval over rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cai_ray.core.types import Message

# Role tags the classifiers read; plain text so any tokenizer (and a base model without a
# chat template) sees the same thing in training and in serving.
HUMAN, ASSISTANT = "Human:", "Assistant:"


def _render(messages: Sequence[Message]) -> str:
    parts = []
    for m in messages:
        role = m.get("role")
        if role == "system":
            continue  # the operator's system prompt is not the user's request
        tag = HUMAN if role == "user" else ASSISTANT
        parts.append(f"{tag} {str(m.get('content', '')).strip()}")
    return "\n\n".join(parts)


def input_text(messages: Sequence[Message]) -> str:
    """What the input classifier reads: the conversation (system turns left out)."""
    return _render(messages)


def output_text(messages: Sequence[Message], answer: str) -> str:
    """What the output classifier reads: the conversation and the (partial) answer."""
    return f"{_render(messages)}\n\n{ASSISTANT} {answer.strip()}"


def prefixes(answer: str, every_chars: int, limit: int = 4) -> list[str]:
    """Up to ``limit`` growing prefixes of an answer, cut at word ends every ~every_chars,
    ending with the whole answer: the shapes a streaming check sees."""
    cuts, at = [], every_chars
    while at < len(answer) and len(cuts) < limit - 1:
        end = answer.rfind(" ", 0, at)
        if end > 0 and (not cuts or end > cuts[-1]):
            cuts.append(end)
        at += every_chars
    return [answer[:c] for c in cuts] + [answer]


# -- metrics ----------------------------------------------------------------------------------
def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    # average ranks over ties
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        avg = (i + j) / 2 + 1
        rank_sum += avg * sum(1 for k in range(i, j + 1) if ranked[k][1])
        i = j + 1
    n_pos, n_neg = len(pos), len(neg)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def threshold_at_recall(scores: Sequence[float], labels: Sequence[int], recall: float) -> float | None:
    """The highest threshold t with recall(score >= t) >= ``recall``; None without positives."""
    pos = sorted((s for s, y in zip(scores, labels) if y), reverse=True)
    if not pos:
        return None
    import math

    k = max(1, math.ceil(recall * len(pos)))
    return pos[k - 1]


def rates_at(scores: Sequence[float], labels: Sequence[int], threshold: float) -> dict[str, Any]:
    """Recall and false-positive rate of ``score >= threshold``."""
    pos = [s >= threshold for s, y in zip(scores, labels) if y]
    neg = [s >= threshold for s, y in zip(scores, labels) if not y]
    return {
        "recall": sum(pos) / len(pos) if pos else None,
        "fpr": sum(neg) / len(neg) if neg else None,
        "positives": len(pos),
        "negatives": len(neg),
    }


def _boot(scores, labels, stat, n_boot: int, seed: int, level: float = 0.95):
    import numpy as np

    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    if s.size == 0:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, s.size, size=s.size)
        v = stat(s[idx].tolist(), y[idx].tolist())
        if v is not None:
            vals.append(v)
    if not vals:
        return None
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def classifier_metrics(
    scores: Sequence[float],
    labels: Sequence[int],
    recall: float,
    threshold: float | None = None,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC and the FPR at ``recall`` with bootstrap intervals. ``threshold`` given (chosen
    on other data, as the guard uses it): rates at that threshold; else the threshold that
    reaches ``recall`` here (its FPR interval re-picks the threshold per resample)."""
    out: dict[str, Any] = {"n": len(scores), "auroc": auroc(scores, labels)}
    out["auroc_ci"] = _boot(scores, labels, auroc, n_boot, seed) if out["auroc"] is not None else None
    if threshold is None:
        threshold = threshold_at_recall(scores, labels, recall)

        def fpr(s, y):
            t = threshold_at_recall(s, y, recall)
            return None if t is None else rates_at(s, y, t)["fpr"]
    else:

        def fpr(s, y, t=threshold):
            return rates_at(s, y, t)["fpr"]

    out["threshold"] = threshold
    out["target_recall"] = recall
    if threshold is not None:
        out.update(rates_at(scores, labels, threshold))
        out["fpr_ci"] = _boot(scores, labels, fpr, n_boot, seed + 1) if out["fpr"] is not None else None
    return out


def flag_rate(scores: Sequence[float], threshold: float, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Share of rows at or above the threshold (one set, no labels), with its interval."""
    from cai_ray.core.eval_math import bootstrap_ci

    flags = [1.0 if s >= threshold else 0.0 for s in scores]
    return {
        "n": len(flags),
        "rate": sum(flags) / len(flags) if flags else None,
        "ci": list(bootstrap_ci(flags, n_boot=n_boot, seed=seed) or []) or None,
    }
