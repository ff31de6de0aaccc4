"""How far the AI labeler agrees with the people who reviewed its unsure labels."""

from __future__ import annotations

from typing import Any


def ai_vs_human(output) -> dict[str, Any]:
    """On the reviewed pairs of a label run's ``output``: the AI's label (a when p_a >= 0.5,
    else b; none when it gave none) against the people's (a, b or tie; with several reviewers
    the majority, a tie when they split), as Cohen's kappa with a bootstrap interval, raw
    agreement, and the counts."""
    from cai_ray.core.eval_math import cohen_kappa, cohen_kappa_ci
    from cai_ray.review.store import human_labels, read_queue

    queue = {q["pair_id"]: q for q in read_queue(output)}
    humans = human_labels(output)
    ai, people = [], []
    for pid, h in sorted(humans.items()):
        q = queue.get(pid)
        if q is None or q.get("p_a") is None:
            continue
        ai.append("a" if q["p_a"] >= 0.5 else "b")
        people.append("a" if h["p_a"] > 0.5 else "b" if h["p_a"] < 0.5 else "tie")
    kappa = cohen_kappa(ai, people)
    return {
        "reviewed_pairs": len(humans),
        "compared": len(ai),  # reviewed pairs that had an AI label
        "agreement": round(sum(x == y for x, y in zip(ai, people)) / len(ai), 4) if ai else None,
        "kappa": None if kappa is None else round(kappa, 4),
        "kappa_ci": cohen_kappa_ci(ai, people),
        "human_ties": people.count("tie"),
        "reviewers": sorted({r for h in humans.values() for r in h["labels"]}),
    }
