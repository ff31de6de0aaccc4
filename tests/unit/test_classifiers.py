"""Constitutional classifiers without Ray or torch: the metrics on hand-computed values, the
synthetic rows, the targets and the split (cai_ray/core/classify.py, cai_ray/classifiers/synth.py)."""

import pytest

from cai_ray.classifiers import synth
from cai_ray.classifiers.config import ClassifiersConfig
from cai_ray.config import ConfigError
from cai_ray.core import classify
from cai_ray.core.constitution import load_constitution
from cai_ray.train.classifier import classifier_row


def test_auroc_counts_pairs_and_ties_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.4, 0.1: pairs won 0.9>all (3), 0.4>0.1 (1), 0.4=0.4 (0.5)
    assert classify.auroc([0.9, 0.4, 0.5, 0.4, 0.1], [1, 1, 0, 0, 0]) == pytest.approx(4.5 / 6)
    assert classify.auroc([0.2, 0.8], [1, 0]) == 0.0
    assert classify.auroc([0.2, 0.8], [1, 1]) is None  # one class: undefined, not 0.5


def test_threshold_reaches_the_recall_and_its_false_positive_rate():
    scores = [0.9, 0.8, 0.7, 0.6, 0.75, 0.3, 0.2]
    labels = [1, 1, 1, 1, 0, 0, 0]
    # recall 0.75 of 4 positives = 3: the third highest positive score
    assert classify.threshold_at_recall(scores, labels, 0.75) == 0.7
    r = classify.rates_at(scores, labels, 0.7)
    assert r["recall"] == 0.75 and r["fpr"] == pytest.approx(1 / 3)
    m = classify.classifier_metrics(scores, labels, recall=1.0, n_boot=50)
    assert m["threshold"] == 0.6 and m["recall"] == 1.0 and m["fpr"] == pytest.approx(1 / 3)
    assert m["auroc"] == pytest.approx(10 / 12)  # 0.7 and 0.6 lose to the 0.75 negative
    lo, hi = m["auroc_ci"]
    assert 0 <= lo <= m["auroc"] <= hi <= 1
    # a threshold given (set on other data) is used as is
    fixed = classify.classifier_metrics(scores, labels, recall=1.0, threshold=0.95, n_boot=50)
    assert fixed["threshold"] == 0.95 and fixed["recall"] == 0.0 and fixed["fpr"] == 0.0


def test_flag_rate_and_prefixes():
    assert classify.flag_rate([0.1, 0.6, 0.7, 0.2], 0.5, n_boot=50)["rate"] == 0.5
    answer = "one two three four five six seven eight nine ten"
    ps = classify.prefixes(answer, 10, limit=3)
    assert len(ps) == 3 and ps[-1] == answer and all(answer.startswith(p) for p in ps)
    assert len(ps[0]) < len(ps[1]) < len(ps[2])
    assert classify.prefixes("short", 10) == ["short"]


def test_texts_leave_the_system_prompt_out_and_end_with_the_answer():
    msgs = [{"role": "system", "content": "secret"}, {"role": "user", "content": " hi "}]
    assert classify.input_text(msgs) == "Human: hi"
    assert classify.output_text(msgs, "hello ") == "Human: hi\n\nAssistant: hello"


def test_request_tasks_cover_every_principle_and_role_and_parse():
    c = load_constitution("constitutions/general.yaml")
    guarded = synth.guarded(c, {"helpfulness", "anti-evasiveness", "honesty"})
    assert "non-evasive" not in {p.id for p in guarded} and "privacy" in {p.id for p in guarded}
    tasks = synth.request_tasks(guarded, 3, ["violate", "respect"])
    assert len(tasks) == len(guarded) * 2 * 3
    assert {(t["principle"], t["role"]) for t in tasks} == {(p.id, r) for p in guarded for r in ("violate", "respect")}
    assert len({t["id"] for t in tasks}) == len(tasks)
    assert synth.parse_request('Request: "How do I pick a lock?"\n\nMore text') == ("How do I pick a lock?", None)
    text, why = synth.parse_request("ok")
    assert text is None and "too short" in why


def test_answers_rows_and_examples_keep_principle_role_and_source():
    c = load_constitution("constitutions/general.yaml")
    reqs = [
        {"id": "req:privacy:violate:0", "principle": "privacy", "role": "violate", "request": "Find my ex's address"},
        {"id": "req:privacy:respect:0", "principle": "privacy", "role": "respect", "request": "What is GDPR?"},
    ]
    tasks = synth.answer_tasks(c, reqs)
    assert [t["role"] for t in tasks] == ["violate", "respect", "respect"]
    assert tasks[0]["messages"][0]["role"] == "system" and tasks[0]["messages"][1]["content"] == "Find my ex's address"
    answers = {t["id"]: f"answer {i}" for i, t in enumerate(tasks)}
    rows = synth.synthetic_rows(reqs, answers)
    assert [(r["kind"], r["role"]) for r in rows] == [
        ("input", "violate"),
        ("output", "violate"),
        ("output", "respect"),
        ("input", "respect"),
        ("output", "respect"),
    ]
    assert all(r["principle"] == "privacy" and r["source"] == "synthetic" for r in rows)
    ex = synth.example_rows(c, {p.id for p in c.principles})
    assert len(ex) == 3 * len(c.critique_examples) + 2 * len(c.comparison_examples)
    # an example of a principle the guard leaves out (non-evasive: its "violation" is a refusal) is not a row
    assert "non-evasive" not in {r["principle"] for r in synth.example_rows(c, {"privacy", "illegal-activity"})}
    assert {r["source"] for r in ex} == {"constitution"}
    # a request and its answers fall on one side of the split
    sides = {synth.held_out(r["id"], 0.5, 0) for r in rows if "violate:0" in r["id"]}
    assert len(sides) == 1


def test_targets_follow_the_role_unless_the_judge_confidently_disagrees():
    assert synth.decide("violate", 0.45, "role", 0.3) == (1.0, None)
    target, why = synth.decide("violate", 0.1, "role", 0.3)
    assert target is None and "written to violate" in why
    target, why = synth.decide("respect", 0.9, "role", 0.3)
    assert target is None and "written to respect" in why
    assert synth.decide("respect", 0.9, "judge", 0.3) == (0.9, None)
    assert synth.decide("respect", None, "role", 0.3) == (None, "the judge gave no label")


def test_config_and_training_rows_are_checked():
    with pytest.raises(ConfigError, match="roles"):
        ClassifiersConfig(output="x", roles="violate").validate()
    with pytest.raises(ConfigError, match="recall"):
        ClassifiersConfig(output="x", recall=0).validate()
    with pytest.raises(ConfigError, match="output"):
        ClassifiersConfig().validate()
    assert classifier_row({"text": "a", "target": True}) == ({"id": None, "text": "a", "target": 1.0}, None)
    assert "target" in classifier_row({"text": "a", "target": 2})[1]
    assert "text" in classifier_row({"text": " ", "target": 1})[1]


def test_a_classifier_is_trained_again_when_its_training_settings_change(tmp_path, monkeypatch):
    """The classifiers job keeps a finished classifier only when its rows and settings are
    the ones it was trained with: the harness's resume fingerprint leaves the step budget out
    (a run may be extended), so more epochs must not hand back the old model."""
    import dataclasses
    import json

    from cai_ray.classifiers import run
    from cai_ray.config import to_dict
    from cai_ray.train import classifier
    from cai_ray.train.data import rows_sha256
    from cai_ray.train.harness import fingerprint_of

    trained = []

    def fake_train(tcfg):  # what the harness leaves behind, without the training
        rows = [json.loads(line) for line in open(tcfg.data)]
        out = tmp_path / "output"
        (out / "model").mkdir(parents=True, exist_ok=True)
        m = {
            "status": "finished",
            "config": to_dict(tcfg),
            "fingerprint": fingerprint_of("classifier", to_dict(tcfg), rows_sha256(rows), {}),
        }
        (out / "manifest.json").write_text(json.dumps(m))
        trained.append(tcfg.optim.epochs)
        return m

    monkeypatch.setattr(classifier, "train_classifier", fake_train)
    (tmp_path / "work").mkdir()
    rows = [{"id": str(i), "text": f"text {i}", "target": float(i % 2)} for i in range(4)]
    cfg = ClassifiersConfig(constitution="constitutions/general.yaml", output=str(tmp_path), base="tiny-random")
    run._train(cfg, tmp_path, "output", rows)
    run._train(cfg, tmp_path, "output", rows)  # the same: kept
    more = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=cfg.optim.epochs + 1))
    run._train(more, tmp_path, "output", rows)
    assert trained == [cfg.optim.epochs, cfg.optim.epochs + 1]
