"""The review queue's reasons and order, and the append-only label store (HRLAIF)."""

import json
import math

import pytest

from cai_ray.core import review as q
from cai_ray.core import review as store


class Review:
    fraction, max_rows, margin, spread = 1.0, 10, 0.1, 0.15


class Constitution:
    sha256 = "c0ffee"

    class P:
        def __init__(self, pid):
            self.id, self.comparison_question = pid, f"Which answer is better by {pid}?"

    principles = [P("harm"), P("honesty")]


def row(pid, p_a, ab, ba, consistent=True, by_ab=None, by_ba=None, why=None):
    return {
        "id": pid,
        "prompt_id": pid.split("/")[0],
        "prompt_messages": [{"role": "user", "content": "q"}],
        "response_a": "a",
        "response_b": "b",
        "p_a": p_a,
        "p_ab": ab,
        "p_ba": ba,
        "position_consistent": consistent,
        "principle_ids": ["harm", "honesty"],
        "p_ab_by_principle": by_ab,
        "p_ba_by_principle": by_ba,
        "filter_reason": why,
    }


def test_each_reason_and_the_order_most_unsure_first():
    rows = [
        row("sure/0", 0.9, 0.9, 0.9, by_ab=[0.9, 0.9], by_ba=[0.9, 0.9]),  # not queued
        row("close/0", 0.53, 0.53, 0.53, by_ab=[0.53, 0.53], by_ba=[0.53, 0.53]),  # margin
        row("flip/0", 0.5, 0.7, 0.3, consistent=False, by_ab=[0.7, 0.7], by_ba=[0.3, 0.3]),  # order + margin
        row("split/0", 0.8, 0.8, 0.8, by_ab=[0.95, 0.65], by_ba=[0.95, 0.65]),  # spread (sd 0.212)
        row("none/0", None, None, None, why="invalid: the labeler's context is too short"),
    ]
    out = q.build_queue(rows, Constitution, Review)
    assert [x["pair_id"] for x in out] == ["flip/0", "none/0", "close/0", "split/0"]
    by = {x["pair_id"]: x["reasons"] for x in out}
    assert [r.split(":")[0] for r in by["flip/0"]] == ["order disagreement", "margin"]
    assert by["close/0"] == ["margin: |p_a - 0.5| = 0.030 < review.margin 0.1"]
    assert by["split/0"][0].startswith("ensemble spread: the principles' P(A better) vary by sd 0.212")
    assert by["none/0"] == ["no AI label: invalid: the labeler's context is too short"]
    assert out[0]["principles"][1] == {"id": "honesty", "question": "Which answer is better by honesty?"}
    assert out[0]["constitution"] == "c0ffee" and out[-1]["uncertainty"] == pytest.approx(0.4)


def test_the_queue_is_capped_by_fraction_and_rows():
    rows = [row(f"p{i}/0", 0.5, 0.5, 0.5) for i in range(10)]

    class Small(Review):
        fraction, max_rows = 0.25, 10

    assert len(q.build_queue(rows, Constitution, Small)) == math.ceil(2.5)

    class Few(Review):
        fraction, max_rows = 1.0, 2

    assert len(q.build_queue(rows, Constitution, Few)) == 2


def test_labels_are_append_only_and_undo_withdraws_the_latest(tmp_path):
    log = store.LabelLog(tmp_path)
    log.append("label", "p1", "ann", "a")
    log.append("label", "p2", "ann", "b")
    log.append("label", "p2", "bob", "tie")
    log.append("undo", "p2", "ann")
    log.append("label", "p3", "ann", "skip")
    lines = (tmp_path / "review" / "labels.jsonl").read_text().splitlines()
    assert len(lines) == 5 and [json.loads(x)["seq"] for x in lines] == [1, 2, 3, 4, 5]
    with open(tmp_path / "review" / "labels.jsonl", "a") as f:
        f.write('{"event": "label", "pair_id": "p4"')  # a torn last line (a crash mid-write)
    got = store.human_labels(tmp_path)
    assert got == {
        "p1": {"labels": {"ann": "a"}, "p_a": 1.0, "n": 1},
        "p2": {"labels": {"bob": "tie"}, "p_a": 0.5, "n": 1},  # ann's b was undone; p3 was skipped
    }
    assert store.LabelLog(tmp_path).seq == 5  # a restarted server numbers on
    with pytest.raises(ValueError, match="a, b, tie, skip"):
        log.append("label", "p1", "ann", "maybe")


def _queue(tmp_path, rows):
    (tmp_path / "review").mkdir(parents=True, exist_ok=True)
    (tmp_path / "review" / "queue.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _q(pid, p_a, a="answer a", b="answer b"):
    return {
        "pair_id": pid,
        "prompt": [{"role": "user", "content": f"q {pid}"}],
        "response_a": a,
        "response_b": b,
        "p_a": p_a,
    }


def _ai(pid, chosen, rejected, p):
    return {
        "id": pid,
        "prompt": [{"role": "user", "content": f"q {pid}"}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": p,
    }


def test_human_labels_take_precedence_and_are_counted(tmp_path):
    """p1: the AI chose A at 0.55, a person says B (flipped); p2: the AI chose A, two people
    say A and tie (0.75); p3: filtered out by the AI, a person says B (added back from the
    queue); p4: a tie (kept with soft targets, left out and its AI row dropped without);
    p9: a label for a pair this queue never held (not used)."""
    from cai_ray.train.data import with_human_labels

    _queue(tmp_path, [_q("p1", 0.55), _q("p2", 0.6), _q("p3", 0.5), _q("p4", 0.52)])
    log = store.LabelLog(tmp_path)
    for pid, who, label in (
        ("p1", "ann", "b"),
        ("p2", "ann", "a"),
        ("p2", "bob", "tie"),
        ("p3", "ann", "b"),
        ("p4", "ann", "tie"),
        ("p9", "ann", "a"),
    ):
        log.append("label", pid, who, label)
    rows = [
        _ai("p1", "answer a", "answer b", 0.55),
        _ai("p2", "answer a", "answer b", 0.6),
        _ai("p4", "answer a", "answer b", 0.52),
        _ai("p5", "x", "y", 0.9),  # not reviewed: the AI's label stands
    ]
    soft, info = with_human_labels(rows, str(tmp_path), "auto", ties=True)
    by = {r["id"]: r for r in soft}
    assert by["p1"]["chosen"][0]["content"] == "answer b" and by["p1"]["p_chosen"] == 1.0
    assert by["p2"]["chosen"][0]["content"] == "answer a" and by["p2"]["p_chosen"] == 0.75
    assert by["p3"]["chosen"][0]["content"] == "answer b" and by["p3"]["prompt"][0]["content"] == "q p3"
    assert by["p4"]["p_chosen"] == 0.5 and by["p5"] == rows[3]
    assert {k: info[k] for k in ("pairs", "overrode_ai", "added", "flipped", "ties_left_out", "not_in_queue")} == {
        "pairs": 4,
        "overrode_ai": 3,
        "added": 1,
        "flipped": 1,
        "ties_left_out": 0,
        "not_in_queue": 1,
    }
    agreement = info["agreement"]  # AI a,a,a,a (p_a >= 0.5) vs people b,a,b,tie
    assert agreement["compared"] == 4 and agreement["agreement"] == 0.25 and agreement["reviewers"] == ["ann", "bob"]
    hard, info = with_human_labels(rows, str(tmp_path), "auto", ties=False)
    assert "p4" not in {r["id"] for r in hard} and info["ties_left_out"] == 1
    assert with_human_labels(rows, str(tmp_path), "none", ties=True) == (rows, {"pairs": 0})
    assert with_human_labels(rows, str(tmp_path / "nothing"), "auto", ties=True)[1] == {"pairs": 0}


def test_cohen_kappa_on_hand_computed_tables():
    from cai_ray.core.eval_math import cohen_kappa, cohen_kappa_ci

    a = ["a"] * 5 + ["b"] * 5
    b = ["a", "a", "a", "a", "b", "b", "b", "b", "a", "a"]  # 7 agree; pa=.5, pb=.6 -> chance .5
    assert cohen_kappa(a, b) == pytest.approx((0.7 - 0.5) / 0.5)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # both constant: undefined
    lo, hi = cohen_kappa_ci(a, b)
    assert lo < 0.4 < hi
