from collections import Counter
from pathlib import Path

import pytest
import yaml

from cai_ray.core.constitution import ConstitutionError, load_constitution, parse_constitution

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_CATEGORIES = {
    "violence",
    "cyber",
    "privacy",
    "discrimination",
    "self-harm",
    "fraud",
    "child-safety",
    "misinformation",
    "manipulation",
    "illegal",
    "honesty",
    "helpfulness",
    "anti-evasiveness",
}


def test_shipped_constitutions_are_valid():
    files = sorted((ROOT / "constitutions").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        c = load_constitution(f)
        assert c.principles and c.critique_examples and c.comparison_examples


def test_general_covers_the_required_categories():
    c = load_constitution(ROOT / "constitutions" / "general.yaml")
    assert len(c.principles) >= 16
    assert REQUIRED_CATEGORIES <= {p.category for p in c.principles}


def _good():
    return yaml.safe_load((ROOT / "constitutions" / "tutor.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda d: d["principles"][1].pop("revision_request"),
            "principle 'age-appropriate' (#2): field 'revision_request'",
        ),
        (lambda d: d["principles"][0].update(weight=-1), "principle 'teach-dont-tell' (#1): field 'weight'"),
        (lambda d: d["principles"][2].update(weight=True), "field 'weight'"),
        (lambda d: d["principles"][3].update(id="Bad Id"), "field 'id'"),
        (lambda d: d["principles"][4].update(id="teach-dont-tell"), "field 'id': duplicate id"),
        (lambda d: d["principles"][0].update(critque_request="typo"), "unknown field 'critque_request'"),
        (lambda d: d["principles"][5].update(comparison_question="  "), "field 'comparison_question'"),
        (lambda d: d.update(version=1.0), "field 'version'"),
        (lambda d: d.update(principles=[]), "field 'principles'"),
        (lambda d: d["examples"]["comparison"][0].update(answer="C"), "field 'answer'"),
        (lambda d: d["examples"]["critique_revision"][0].update(principle="nope"), "no principle with id 'nope'"),
        (lambda d: d.update(extra=1), "unknown top-level field 'extra'"),
        (lambda d: d.update(refusal="  "), "field 'refusal': must be a non-empty string"),
        (lambda d: d.update(refusal=["no"]), "field 'refusal'"),
    ],
)
def test_broken_files_name_file_principle_and_field(tmp_path, mutate, expected):
    data = _good()
    mutate(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConstitutionError) as e:
        load_constitution(path)
    assert str(path) in str(e.value)
    assert expected in str(e.value)


def test_the_refusal_is_the_files_or_the_default_and_reads_as_a_refusal():
    """`refusal:` is what the serve guard answers for a flagged prompt or answer: the file's
    text (stripped), else a default; both count as refusals in refusal rates."""
    from cai_ray.core.constitution import DEFAULT_REFUSAL
    from cai_ray.core.refusal import is_refusal

    data = _good()
    data["refusal"] = "  I can't help with that here.\n"
    c = parse_constitution(data)
    assert c.refusal == "I can't help with that here." and c.to_dict()["refusal"] == c.refusal
    assert parse_constitution(c.to_dict()).refusal == c.refusal  # round trip
    data.pop("refusal")
    assert parse_constitution(data).refusal == DEFAULT_REFUSAL and is_refusal(DEFAULT_REFUSAL)
    for f in sorted((ROOT / "constitutions").glob("*.yaml")):
        c = load_constitution(f)
        assert is_refusal(c.refusal), (f.name, c.refusal)
    assert load_constitution(ROOT / "constitutions" / "general.yaml").refusal != DEFAULT_REFUSAL


def test_all_errors_are_reported_at_once(tmp_path):
    data = _good()
    data["principles"][0]["weight"] = 0
    data["principles"][1]["category"] = ""
    with pytest.raises(ConstitutionError) as e:
        parse_constitution(data, where="x.yaml")
    assert len(str(e.value).splitlines()) == 2


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConstitutionError, match="bad.yaml: invalid YAML"):
        load_constitution(bad)
    with pytest.raises(ConstitutionError, match="file not found"):
        load_constitution(tmp_path / "missing.yaml")


def test_sampling_is_seeded_per_row(general_constitution):
    c = general_constitution
    a = [p.id for p in c.sample("row-1", 4, seed=7)]
    assert a == [p.id for p in c.sample("row-1", 4, seed=7)]
    draws = {tuple(p.id for p in c.sample("row-1", 4, seed=s)) for s in range(20)}
    assert len(draws) > 1  # the seed matters
    assert [p.id for p in c.sample("row-2", 4, seed=7)] != a or [p.id for p in c.sample("row-3", 4, seed=7)] != a


def test_sampling_respects_weights():
    data = _good()
    for p in data["principles"]:
        p["weight"] = 1.0
    data["principles"][0]["weight"] = 5.0
    c = parse_constitution(data)
    n = 20000
    counts = Counter(p.id for i in range(n) for p in c.sample(f"r{i}", 1, seed=0))
    share = counts["teach-dont-tell"] / n
    assert abs(share - 5 / 10) < 0.02, share
    for p in c.principles[1:]:
        assert abs(counts[p.id] / n - 0.1) < 0.015
