"""`cai-ray constitution derive` with the embedded SmolLM2-135M on a planted rule.

The planted rule: of two replies with the same words, people chose the one in ordinary case
over the one in ALL CAPITALS. SmolLM2-135M does not draft that principle (the case of the
words is all that differs, and it writes "Which reply is more polite?"); the measured
contrasts (`collective/contrasts.py`: chosen has fewer capitals in every training pair) propose
"Which reply uses fewer capital letters?", and scoring with the labeler keeps it above chance
and above the model's draft and an unrelated principle given via --candidates. Nobody gives
the right wording: it comes from the data.

What this shows is that the scoring separates a principle the labeler reacts to from one it
does not, not that a 135M model understands the rule: the reversed wording ("Which reply is
written in capital letters?") also scores 20/20 on the same pairs (docs/constitutions.md).
"""

import json

import pytest
import yaml

from cai_ray.collective.derive import derive
from cai_ray.config import load_config
from cai_ray.core.constitution import load_constitution
from cai_ray.core.labeler import Labeler, LabelSettings

CONTRAST = "Which reply uses fewer capital letters?"
UNRELATED = "Which reply is more accurate about historical facts?"
TOPICS = [
    "the weather in Paris",
    "how to bake bread",
    "the history of Rome",
    "learning to swim",
    "saving money",
    "planting tomatoes",
    "fixing a bike tyre",
    "writing a cover letter",
    "training a puppy",
    "brewing coffee",
    "choosing a laptop",
    "running a marathon",
    "painting a room",
    "learning guitar",
    "cooking rice",
    "reading more books",
    "sleeping better",
    "starting a blog",
    "cleaning a kitchen",
    "studying for exams",
    "planning a trip",
    "making friends",
]


def planted(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        reply = (
            f"Here is some help with {t}. Start small and be patient with {t}. Many people find {t} easier with a plan."
        )
        rows.append(
            {"id": f"caps-{i}", "prompt": f"Can you give me advice on {t}?", "chosen": reply, "rejected": reply.upper()}
        )
    return rows


@pytest.fixture(scope="module")
def engine():
    from cai_ray.engine import load_engine

    return load_engine("hf", model="smollm2", dtype="float32")


@pytest.fixture(scope="module")
def derived(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("derive")
    prefs = folder / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in planted(66)), encoding="utf-8")
    cands = folder / "candidates.txt"
    cands.write_text(f"{UNRELATED}\n", encoding="utf-8")
    result = derive(
        prefs,
        folder / "derived.yaml",
        engine=engine,
        candidates=cands,
        clusters=1,
        k=3,
        draft_tokens=24,
        min_accuracy=0.0,
        seed=0,
    )
    print("\n".join(result.report()))
    return result


@pytest.mark.slow
def test_the_planted_rule_is_recovered_above_chance(derived):
    assert derived.held_out == 20 and derived.train == 46
    by_question = {c.question: c for c in derived.candidates}
    found, unrelated = by_question[CONTRAST], by_question[UNRELATED]
    assert found.n == unrelated.n == 20 and found.invalid == 0
    assert found.source == {"kind": "contrast", "feature": "capitals", "direction": "less", "share": 1.0}
    top = derived.kept[0][1]
    assert top is found, [(c.question, c.hits, c.interval) for c in derived.candidates]
    assert top.interval[0] > 0.5 and top.accuracy > unrelated.accuracy
    # the model really drafted, and its draft was scored beside the given candidates
    assert len(derived.drafts) == 1
    draft = derived.drafts[0]
    assert draft["text"].startswith("Which reply")
    if draft["question"]:
        assert draft["question"] in by_question
    raw = yaml.safe_load(derived.output.read_text())
    prov = raw["principles"][0]["provenance"]
    assert prov["n_held_out"] == 20 and prov["ci"][0] > 0.5
    assert raw["provenance"]["engine"] == {"backend": "hf", "model": "smollm2", "dtype": "float32"}
    rows = [json.loads(x) for x in derived.output.with_name("derived.yaml.candidates.jsonl").read_text().splitlines()]
    assert len(rows) == len(derived.candidates) + (0 if draft["question"] else 1)


@pytest.mark.slow
def test_a_derived_constitution_labels_like_any_other(derived, engine):
    from cai_ray.label.config import LabelConfig
    from cai_ray.label.run import load_router

    folder = derived.output.parent
    overrides = [f"input={folder / 'prefs.jsonl'}", f"output={folder / 'label'}", f"constitution={derived.output}"]
    cfg = load_config(LabelConfig, None, [*overrides, "method.principles_per_pair=2"])
    constitution = load_router(cfg).default
    assert constitution == load_constitution(derived.output)
    assert all(p.category == "derived" for p in constitution.principles)
    labeler = Labeler(engine, constitution, LabelSettings.of(cfg.method, cfg.seed))
    rows = planted(2)
    labels = labeler.label(
        [r["id"] for r in rows],
        [[{"role": "user", "content": r["prompt"]}] for r in rows],
        [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
    )
    assert all(lab.invalid is None and 0 < lab.p_a < 1 for lab in labels)
    assert all(set(lab.principle_ids) <= {p.id for p in constitution.principles} for lab in labels)
