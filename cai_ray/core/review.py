"""Human review where the AI labeler is unsure (HRLAIF): which labels go to people, the files
their labels live in, and how far the AI agrees with them. The label step writes the queue
(label/run.py), the review page serves it (serve/review.py), the trainers read the labels
(train/data.py).

A labelled pair is a candidate when at least one of these holds, each a reason in its row:

    order disagreement   the two orders prefer different answers (position_consistent false)
    margin               |p_a - 0.5| < review.margin: the labeler barely prefers either
    ensemble spread      the principles' own probabilities differ by more than review.spread
                         (their standard deviation, each principle's two orders averaged)
    no AI label          the labeler could not label it (the reason it gave)

Candidates are ordered by how many reasons they have, then by uncertainty 1 - 2·|p_a - 0.5|
(1 without a label), and capped at ceil(review.fraction × pairs) and review.max_rows.

The files, beside a label run's output:

    OUTPUT/review/queue.jsonl    one row per pair the AI labeler is least sure of (label writes it):
                                 pair_id, prompt_id, prompt (messages), response_a, response_b,
                                 principles [{id, question}], p_a, p_ab, p_ba, p_ab_by_principle,
                                 p_ba_by_principle, position_consistent, reasons [str],
                                 uncertainty (0..1, the queue's order), kept (in data/ or filtered/)
    OUTPUT/review/labels.jsonl   append-only, one event per line, never rewritten:
                                 {"event": "label", "pair_id", "label": "a"|"b"|"tie"|"skip",
                                  "reviewer", "time", "seq"}
                                 {"event": "undo", "pair_id", "reviewer", "time", "seq"}
                                 (an undo withdraws that reviewer's latest standing label of the pair)

A label is written (and flushed, fsynced) before the page is answered, so a browser or server
that stops mid-review loses nothing; reading the file back gives every reviewer's standing labels.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from cai_ray.core.labeler import PAIR_LABEL_COLUMNS

# -- the queue: which labels need a person --------------------------------------------------------
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


# -- the files: the queue and the people's labels ------------------------------------------------
LABELS = ("a", "b", "tie", "skip")
HARD = {"a": 1.0, "b": 0.0, "tie": 0.5}  # P(response_a is better) of a human label; skip has none


def review_dir(output: str | Path) -> Path:
    return Path(output) / "review"


def read_queue(output: str | Path) -> list[dict[str, Any]]:
    path = review_dir(output) / "queue.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_events(output: str | Path) -> list[dict[str, Any]]:
    """Every event in labels.jsonl, in order; a torn last line (a crash mid-write) is ignored."""
    path = review_dir(output) / "labels.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def standing(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(pair_id, reviewer) -> that reviewer's standing label event (undos applied)."""
    stacks: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in events:
        key = (e["pair_id"], e["reviewer"])
        if e.get("event") == "undo":
            if stacks.get(key):
                stacks[key].pop()
        elif e.get("event") == "label" and e.get("label") in LABELS:
            stacks.setdefault(key, []).append(e)
    return {k: v[-1] for k, v in stacks.items() if v}


def human_labels(output: str | Path) -> dict[str, dict[str, Any]]:
    """pair_id -> {"p_a": mean of the reviewers' hard labels (a 1, b 0, tie 0.5), "n": how many
    reviewers gave one, "labels": {reviewer: label}}. Skips count for nothing."""
    out: dict[str, dict[str, Any]] = {}
    for (pair, reviewer), e in standing(read_events(output)).items():
        if e["label"] == "skip":
            continue
        d = out.setdefault(pair, {"labels": {}})
        d["labels"][reviewer] = e["label"]
    for d in out.values():
        vals = [HARD[v] for v in d["labels"].values()]
        d["p_a"], d["n"] = sum(vals) / len(vals), len(vals)
    return out


class LabelLog:
    """Appends events to labels.jsonl (one writer per process; lines are small enough that
    concurrent appenders do not interleave)."""

    def __init__(self, output: str | Path):
        self.path = review_dir(output) / "labels.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.seq = len(read_events(output))

    def append(self, event: str, pair_id: str, reviewer: str, label: str | None = None) -> dict[str, Any]:
        if event == "label" and label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        with self.lock:
            self.seq += 1
            e = {"event": event, "pair_id": pair_id, "reviewer": reviewer, "time": time.time(), "seq": self.seq}
            if label is not None:
                e["label"] = label
            with open(self.path, "a") as f:
                f.write(json.dumps(e) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return e


# -- agreement ---------------------------------------------------------------------------------------
def ai_vs_human(queue: dict[str, dict[str, Any]], humans: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """On the reviewed pairs (``humans``: ``human_labels``; ``queue``: the queue rows by pair
    id, which hold the AI's p_a): the AI's label (a when p_a >= 0.5,
    else b; none when it gave none) against the people's (a, b or tie; with several reviewers
    the majority, a tie when they split), as Cohen's kappa with a bootstrap interval, raw
    agreement, and the counts."""
    from cai_ray.core.eval_math import cohen_kappa, cohen_kappa_ci

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
