"""Which AI labels people should look at: the ones the labeler is least sure of (HRLAIF).

A labelled pair is a candidate when at least one of these holds, each a reason in its row:

    order disagreement   the two orders prefer different answers (position_consistent false)
    margin               |p_a - 0.5| < review.margin: the labeler barely prefers either
    ensemble spread      the principles' own probabilities differ by more than review.spread
                         (their standard deviation, each principle's two orders averaged)
    no AI label          the labeler could not label it (the reason it gave)

Candidates are ordered by how many reasons they have, then by uncertainty 1 - 2·|p_a - 0.5|
(1 without a label), and capped at ceil(review.fraction × pairs) and review.max_rows.
"""

from __future__ import annotations

import math
from typing import Any

from cai_ray.core.labeler import PAIR_LABEL_COLUMNS

# what the queue reads of the label output: the pair, the AI's label (core.labeler's columns,
# without the CoT reasoning) and why it was filtered
COLUMNS = [
    "id",
    "prompt_id",
    "prompt_messages",
    "response_a",
    "response_b",
    *(c for c in PAIR_LABEL_COLUMNS if c != "reasoning"),
    "filter_reason",
    "constitution",
]


def principle_probs(row: dict[str, Any]) -> list[float]:
    """Each principle's P(response_a is better), its two orders averaged (order BA's p is
    already P(response_a))."""
    ab = row.get("p_ab_by_principle") or []
    ba = row.get("p_ba_by_principle") or []
    if ba and len(ba) == len(ab):
        return [(x + y) / 2 for x, y in zip(ab, ba)]
    return list(ab)


def reasons(row: dict[str, Any], margin: float, spread: float) -> tuple[list[str], float]:
    """Why this label needs a person (empty: it does not), and its uncertainty (0..1)."""
    p = row.get("p_a")
    if p is None or not math.isfinite(p):
        return [f"no AI label: {row.get('filter_reason') or 'none'}"], 1.0
    out = []
    if row.get("position_consistent") is False:
        out.append(f"order disagreement: P(A better) {row['p_ab']:.2f} shown first, {row['p_ba']:.2f} shown second")
    m = abs(p - 0.5)
    if m < margin:
        out.append(f"margin: |p_a - 0.5| = {m:.3f} < review.margin {margin}")
    probs = principle_probs(row)
    if len(probs) >= 2:
        mean = sum(probs) / len(probs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in probs) / (len(probs) - 1))
        if sd > spread:
            out.append(f"ensemble spread: the principles' P(A better) vary by sd {sd:.3f} > review.spread {spread}")
    return out, 1 - 2 * m


def build_queue(rows: list[dict[str, Any]], constitutions, review) -> list[dict[str, Any]]:
    """The queue rows for ``rows`` (the label output's data/ and filtered/), most unsure first.
    ``constitutions``: one Constitution, or {row constitution id: Constitution}."""
    if not isinstance(constitutions, dict):
        constitutions = {None: constitutions}
    default = next(iter(constitutions.values()))
    cands = []
    for row in rows:
        why, u = reasons(row, review.margin, review.spread)
        if why:
            cands.append((len(why), u, row, why))
    cands.sort(key=lambda c: (-c[0], -c[1], str(c[2]["id"])))
    cap = min(review.max_rows, math.ceil(review.fraction * len(rows)))
    out = []
    for _, u, row, why in cands[:cap]:
        constitution = constitutions.get(row.get("constitution"), default)
        questions = {p.id: p.comparison_question for p in constitution.principles}
        out.append(
            {
                "pair_id": row["id"],
                "prompt_id": row["prompt_id"],
                "prompt": row["prompt_messages"],
                "response_a": row["response_a"],
                "response_b": row["response_b"],
                "principles": [{"id": pid, "question": questions.get(pid, "")} for pid in row["principle_ids"] or []],
                **{
                    k: row[k]
                    for k in ("p_a", "p_ab", "p_ba", "position_consistent", "p_ab_by_principle", "p_ba_by_principle")
                },
                "reasons": why,
                "uncertainty": round(u, 4),
                "kept": row["filter_reason"] is None,
                "constitution": row.get("constitution") or constitution.sha256,
                "constitution_sha256": constitution.sha256,
            }
        )
    return out


def write_queue(store, rows: list[dict[str, Any]], constitutions, review) -> dict[str, Any]:
    """review/queue.jsonl in the output ``store``; returns the manifest's figures. A re-run
    writes the queue again, keeping every pair people already labelled (their labels,
    review/labels.jsonl, are never touched), and reports the AI-vs-human agreement so far."""
    from cai_ray.review.agreement import ai_vs_human
    from cai_ray.review.store import human_labels, read_queue

    queue = build_queue(rows, constitutions, review)
    labelled = {} if store.remote else human_labels(store.local())  # people review a local folder
    if labelled:
        have = {q["pair_id"] for q in queue}
        queue += [q for q in read_queue(store.local()) if q["pair_id"] in labelled and q["pair_id"] not in have]
    store.write_jsonl("review/queue.jsonl", queue)
    counts: dict[str, int] = {}
    for q in queue:
        for r in q["reasons"]:
            kind = r.split(":")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return {
        "queued": len(queue),
        "of_pairs": len(rows),
        "by_reason": counts,
        "queue": store.address("review/queue.jsonl"),
        "agreement": ai_vs_human(store.local()) if labelled else None,
    }
