"""The review queue and the human labels, as files beside a label run's output.

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
import os
import threading
import time
from pathlib import Path
from typing import Any

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
