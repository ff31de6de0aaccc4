"""Goodhart monitors for RL: signs that the policy is gaming the reward rather than improving.

- boilerplate: the share of all word n-grams in a step's responses taken by the most common
  ones. A policy that found a phrase the preference model likes repeats it everywhere and
  this share climbs while the reward does too.
- evasiveness: the refusal rate on benign probe prompts (greedy answers, lexical detector).
  A harmlessness reward is easiest to win by refusing everything; this rising is that.
"""

from __future__ import annotations

import re
from collections import Counter

from cai_ray.core.refusal import BENIGN_PROBES

_WORD = re.compile(r"\w+|[^\w\s]")


def top_ngram_share(texts: list[str], n: int = 3, top: int = 10) -> float | None:
    """Occurrences of the ``top`` most common word n-grams / all n-grams (None: no n-grams)."""
    counts: Counter = Counter()
    for t in texts:
        words = _WORD.findall(t.lower())
        counts.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    if not total:
        return None
    return sum(c for _, c in counts.most_common(top)) / total


def load_probes(path: str | None) -> list[str]:
    """The probe prompts: a JSONL/Parquet file (or folder) with ``prompt`` per row, or the built-in set."""
    if path is None:
        return list(BENIGN_PROBES)
    from cai_ray.batch.readers import read_records

    probes = []
    for source, line, row in read_records(path)[0]:
        if "_invalid" in row:
            raise ValueError(f"monitor.probe {source}:{line}: {row['_invalid']}")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"monitor.probe {source}:{line}: needs a non-empty 'prompt' string")
        probes.append(row["prompt"])
    if not probes:
        raise ValueError(f"monitor.probe {path}: no prompts")
    return probes
