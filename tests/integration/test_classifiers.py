"""`cai-ray classifiers` end to end on real parts: tiny-random writes the synthetic requests and
answers, SmolLM2 judges them (Ray Data engine pools), tiny-random classifiers train on Ray Train,
the metrics are recomputable from the rows written; and the classifier trainer learns a
planted rule (`cai-ray train classifier`)."""

import json
import random

import pytest
import yaml

from cai_ray.core import classify

pytestmark = pytest.mark.usefixtures("ray_local")
KEEP = ("cyber-abuse", "illegal-activity", "non-evasive")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One classifiers run on a three-principle constitution (non-evasive is left out as
    answer quality), then the same command again."""
    from cai_ray.classifiers.config import ClassifiersConfig
    from cai_ray.classifiers.run import train_classifiers

    tmp = tmp_path_factory.mktemp("classifiers")
    raw = yaml.safe_load(open("constitutions/general.yaml"))
    raw["principles"] = [p for p in raw["principles"] if p["id"] in KEEP]
    for kind in ("critique_revision", "comparison"):
        raw["examples"][kind] = [e for e in raw["examples"][kind] if e["principle"] in KEEP]
    (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
    from cai_ray.config.sections import EngineConfig

    # the generator is tiny-random (its text is noise either way at this size, and SmolLM2's
    # generation was half of this test's time); the judge is SmolLM2, whose labels are real
    cfg = ClassifiersConfig(
        constitution=str(tmp / "c.yaml"),
        output=str(tmp / "out"),
        per_principle=4,
        held_out=0.4,
        eval_limit=2,
        generator=EngineConfig(model="tiny-random", dtype="float32"),
        base="tiny-random",
        bootstrap=50,
    )
    from dataclasses import replace

    from cai_ray.config.sections import SamplingConfig

    cfg = replace(
        cfg,
        prompt_sampling=SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=24),
        answer_sampling=SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=32),
        optim=replace(cfg.optim, epochs=1.0, per_worker_batch_size=16),
    )
    cfg.validate()
    first = train_classifiers(cfg)
    trained = {k: json.loads((tmp / "out" / k / "manifest.json").read_text())["finished"] for k in ("input", "output")}
    again = train_classifiers(cfg)
    return tmp / "out", first, again, trained


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_keep_principle_role_source_and_the_judges_label(run):
    out, m, *_ = run
    assert m["status"] == "finished" and m["principles"] == ["cyber-abuse", "illegal-activity"]
    c = m["counts"]
    assert c["requests_asked"] == 2 * 2 * 4
    rows = _jsonl(out / "data" / "rows.jsonl")
    filtered = _jsonl(out / "filtered.jsonl")
    rejects = _jsonl(out / "rejects.jsonl")
    # every request was parsed or rejected with its reason; every row kept or filtered with one
    assert c["requests"] + sum(r.get("stage") == "requests" for r in rejects) == c["requests_asked"]
    assert len(rows) + len(filtered) == c["rows"] and all(f["filter_reason"] for f in filtered)
    for r in rows:
        assert r["principle"] in ("cyber-abuse", "illegal-activity")
        assert r["role"] in ("violate", "respect") and r["source"] in ("synthetic", "constitution")
        assert 0 <= r["judge_p"] <= 1 and r["target"] == (1.0 if r["role"] == "violate" else 0.0)
        assert r["split"] in ("train", "held_out")
    assert {(r["kind"], r["role"]) for r in rows} == {
        (k, x) for k in ("input", "output") for x in ("violate", "respect")
    }
    assert {"constitution", "synthetic"} == {r["source"] for r in rows}


def test_metrics_are_those_of_the_held_out_scores_and_the_threshold_reaches_the_recall(run):
    out, m, *_ = run
    metrics = json.loads((out / "metrics.json").read_text())
    scored = _jsonl(out / "data" / "held_out_scores.jsonl")
    guard = json.loads((out / "guard.json").read_text())
    for kind in ("input", "output"):
        held = [r for r in scored if r["kind"] == kind]
        s, y = [r["score"] for r in held], [int(r["target"] >= 0.5) for r in held]
        h = metrics[kind]["held_out"]
        assert h["n"] == len(held) and h["auroc"] == pytest.approx(classify.auroc(s, y))
        assert h["threshold"] == guard[kind]["threshold"] and h["recall"] >= 0.9
        assert h["auroc_ci"][0] <= h["auroc"] <= h["auroc_ci"][1]
        ev = metrics[kind]["eval_sets"]
        assert ev["n"] > 0 and ev["threshold"] == h["threshold"] and "fpr_ci" in ev
        assert set(metrics[kind]["flag_rate"]) == {"harmful", "benign"}
    # the serve guard accepts the folder, and its models load and score
    from cai_ray.engine.classifier import TextClassifier
    from cai_ray.serve.guard import read_guard_spec

    spec = read_guard_spec(out)
    assert spec.output.threshold == metrics["output"]["held_out"]["threshold"]

    clf = TextClassifier(str(out / guard["output"]["model"]))
    ps = clf.scores([classify.output_text([{"role": "user", "content": "hi"}], "hello")] * 2)
    assert len(ps) == 2 and 0 < ps[0] < 1 and ps[0] == pytest.approx(ps[1])


def test_a_second_run_resumes_without_redoing_anything(run):
    out, first, again, trained = run
    for stage in ("requests", "answers", "judge"):
        assert again["timing"][stage]["written_this_run"] == 0, stage
    # the classifiers were not trained again: their manifests are the first run's
    assert again["metrics"] == first["metrics"]
    for kind in ("input", "output"):
        assert json.loads((out / kind / "manifest.json").read_text())["finished"] == trained[kind], kind


def test_the_classifier_trainer_learns_a_planted_rule(tmp_path, capsys):
    """`cai-ray train classifier`: texts drawn from one vocabulary violate, from another
    respect (a planted rule); held-out AUROC above 0.9."""
    from cai_ray.cli import main
    from cai_ray.engine.classifier import TextClassifier

    rng = random.Random(0)
    bad = "bomb rifle poison explode attack weapon gunpowder detonate".split()
    good = "garden flower recipe bread river music poem sunset".split()

    def text(planted):
        return " ".join(rng.choice(bad if planted else good) for _ in range(8))

    rows = [{"id": i, "text": text(i % 2 == 0), "target": int(i % 2 == 0)} for i in range(96)]
    rows.append({"id": "bad", "text": "", "target": 1})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(
        [
            "train",
            "classifier",
            "--data",
            str(tmp_path / "rows.jsonl"),
            "--output",
            str(tmp_path / "clf"),
            "--model",
            "tiny-random",
            "--epochs",
            "4",
            "optim.learning_rate=3e-3",
            "optim.per_worker_batch_size=16",
        ]
    )
    assert rc == 0 and "rejected 1" in capsys.readouterr().out
    clf = TextClassifier(str(tmp_path / "clf" / "model"))
    held = [(text(i % 2 == 0), i % 2 == 0) for i in range(40)]
    scores = clf.scores([t for t, _ in held])
    assert classify.auroc(scores, [int(y) for _, y in held]) > 0.9
