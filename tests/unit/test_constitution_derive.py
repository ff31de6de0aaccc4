"""`cai-ray constitution derive` without a model: reading, splitting, clustering, draft parsing,
the accuracy and its interval, and the whole command on a scripted engine.

The scripted engine (``RuleEngine``) is a labeler that follows a principle only when it names
a word one reply has: asked "Which reply mentions blue?", it picks the reply with "blue" in
either position; asked anything else, it picks position A, which both orders cancel to 0.5
(a miss). So the planted principle scores 100% and every other one 0%, by hand.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cai_ray.batch.readers import RowsError, conversation_id
from cai_ray.cli import main
from cai_ray.collective.derive import (
    Candidate,
    DeriveError,
    derive,
    parse_draft,
    parse_question,
    pool,
    read_candidates,
    score,
)
from cai_ray.collective.files import sha256_of
from cai_ray.collective.preference_pairs import (
    Pair,
    cluster_pairs,
    difference_features,
    pair_row,
    read_pairs,
    split_held_out,
    top_words,
)
from cai_ray.core.constitution import load_constitution
from cai_ray.core.eval_math import wilson_interval

ROOT = Path(__file__).resolve().parents[2]
TOPICS = [
    "baking bread",
    "learning to swim",
    "saving money",
    "planting tomatoes",
    "fixing a bike",
    "training a puppy",
    "brewing coffee",
    "painting a room",
    "learning guitar",
    "cooking rice",
]
COLORS = ["red", "green", "yellow", "black", "white"]


class RuleEngine:
    """Follows "Which reply mentions WORD?" by the word; otherwise always answers (A)."""

    model_name = "rule-engine"
    context_length = 1 << 20

    def __init__(self, drafts: list[str]):
        self.drafts = drafts
        self.draft_prompts: list[str] = []

    def generate(self, convs, params):
        self.draft_prompts += [c[0]["content"] for c in convs]
        return [self.drafts[i % len(self.drafts)] for i in range(len(convs))]

    def choice_logprobs(self, convs, choices):
        out = []
        for conv in convs:
            text = conv[-2]["content"]
            word = re.search(r"Which reply mentions (\w+)\?", text)
            a, b = re.findall(r"<reply>\n(.*?)\n</reply>", text, re.S)
            pick_a = word.group(1) in a if word else True
            out.append([math.log(0.9), math.log(0.1)] if pick_a else [math.log(0.1), math.log(0.9)])
        return out

    def token_counts(self, convs):
        return [100] * len(convs)


def planted_rows(n: int = 40) -> list[dict]:
    """Three pairs in four: chosen says "blue" where rejected names another colour; the
    fourth: chosen says "please" where rejected does not."""
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        if i % 4 != 3:
            c = f"For {t}, keep notes in a blue notebook."
            r = f"For {t}, keep notes in a {COLORS[i % len(COLORS)]} notebook."
        else:
            c = f"For {t}, please start small and go slowly."
            r = f"For {t}, start small and go slowly."
        rows.append({"id": f"p{i}", "prompt": f"Any tips for {t}? ({i})", "chosen": c, "rejected": r})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# -- reading -------------------------------------------------------------------------------------
def test_pair_row_takes_the_three_layouts_and_says_why_not():
    ok, why = pair_row({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    assert why is None and ok == {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": "Hello.",
        "rejected": "Go away.",
    }
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    ok, _ = pair_row({"messages": msgs, "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": "No."})
    assert ok["prompt"] == msgs and ok["chosen"] == "Hello." and ok["rejected"] == "No."
    # the label step's output: full conversations
    conv = [{"role": "user", "content": "Hi?"}]
    ok, _ = pair_row(
        {
            "chosen": [*conv, {"role": "assistant", "content": "Hello."}],
            "rejected": [*conv, {"role": "assistant", "content": "No."}],
        }
    )
    assert ok == {"prompt": conv, "chosen": "Hello.", "rejected": "No."}
    for row, reason in [
        ({"prompt": "Hi?", "chosen": "A."}, "needs 'chosen' and 'rejected'"),
        ({"prompt": "  ", "chosen": "A.", "rejected": "B."}, "needs a non-empty 'prompt'"),
        ({"prompt": "Hi?", "chosen": "Same.", "rejected": " Same. "}, "chosen and rejected are identical"),
        ({"prompt": "Hi?", "chosen": 3, "rejected": "B."}, "'chosen' must be a string or one assistant message"),
        ({"prompt": "Hi?", "messages": conv, "chosen": "A.", "rejected": "B."}, "row has both"),
        ({"prompt": "Hi?", "chosen": "", "rejected": "B."}, "chosen and rejected must be non-empty"),
    ]:
        assert pair_row(row) == (None, pytest.approx(reason)) or pair_row(row)[1].startswith(reason), row


def test_read_pairs_uses_or_rejects_every_row_with_its_reason(tmp_path):
    good = planted_rows(4)
    no_id = {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [*good, no_id, "{not json", {"prompt": "x", "chosen": "a"}, good[1], {"id": 1.5, **no_id}],
    )
    pairs, rejects = read_pairs(str(path))
    assert [p.id for p in pairs] == [
        "p0",
        "p1",
        "p2",
        "p3",
        conversation_id(
            [{"role": "user", "content": "Why?"}],
            [{"role": "assistant", "content": "Because."}],
            [{"role": "assistant", "content": "No."}],
        ),
    ]
    assert [(r["line"], r["reason"].split(":")[0].split(" (")[0]) for r in rejects] == [
        (6, "invalid JSON"),
        (7, "needs 'chosen' and 'rejected'"),
        (8, "repeated id 'p1'"),
        (9, "field 'id' must be a string or integer, got float"),
    ]
    assert len(pairs) + len(rejects) == 9
    with pytest.raises(RowsError, match="no usable rows"):
        read_pairs(str(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])))


def test_split_is_seeded_by_id_not_by_file_order():
    ids = [f"p{i}" for i in range(20)]
    train, held = split_held_out(ids, 0.3, seed=0)
    assert len(held) == 6 and len(train) == 14 and set(train) | set(held) == set(ids) and not set(train) & set(held)
    assert train == [i for i in ids if i in train]  # input order kept
    rtrain, rheld = split_held_out(ids[::-1], 0.3, seed=0)
    assert set(rheld) == set(held)
    assert set(split_held_out(ids, 0.3, seed=1)[1]) != set(held)
    assert split_held_out(["a", "b"], 0.01, 0)[1] and split_held_out(["a", "b"], 0.99, 0)[0]  # one on each side
    with pytest.raises(ValueError, match="at least 2"):
        split_held_out(["a"], 0.5, 0)


# -- clustering ----------------------------------------------------------------------------------
def _pairs(rows):
    return [Pair(r["id"], [{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in rows]


def test_difference_features_by_hand():
    pairs = _pairs(
        [
            {"id": "a", "prompt": "q", "chosen": "The blue cat.", "rejected": "The red cat."},
            {"id": "b", "prompt": "q", "chosen": "A blue dog.", "rejected": "A green dog."},
            {"id": "c", "prompt": "q", "chosen": "Please sit.", "rejected": "Sit red."},
        ]
    )
    x, vocab = difference_features(pairs, min_pairs=2)
    assert vocab == ["blue", "red"]  # 2 pairs each; green, please: 1
    assert x.tolist() == [[1, -1], [1, 0], [0, -1]]


def test_the_planted_clusters_are_found_with_their_words():
    pairs = _pairs(planted_rows(40))
    x, vocab = difference_features(pairs)
    found = cluster_pairs(x, 2, seed=0)
    assert found.k == 2
    groups = {tuple(found.members(j)) for j in range(2)}
    assert groups == {tuple(i for i in range(40) if i % 4 != 3), tuple(range(3, 40, 4))}
    words = {top_words(found.centres[j], vocab)[0][0] for j in range(2)}
    assert words == {"blue", "please"}
    blue = next(j for j in range(2) if top_words(found.centres[j], vocab)[0] == ["blue"])
    assert top_words(found.centres[blue], vocab)[1] == []  # each colour in a fifth of the pairs: < 0.25
    assert set(top_words(found.centres[blue], vocab, least=0.2)[1]) == set(COLORS)
    # more clusters than different pairs: lowered; no telling word: one cluster
    assert cluster_pairs(np.array([[1.0], [1.0], [-1.0]]), 5, 0).k == 2
    assert cluster_pairs(np.zeros((4, 0)), 3, 0).k == 1


# -- drafts and candidates -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("continuation", "question"),
    [
        (" mentions the color blue?", "Which reply mentions the color blue?"),
        (" is shorter? Because people like short replies.", "Which reply is shorter?"),
        ("Which reply says please?\nMore text", "Which reply says please?"),
        ("\nWhich reply is better?", "Which reply is better?"),  # the question started again
        ("is more polite?", "Which reply is more polite?"),  # the first token's space decoded away
        (' is more polite?"', "Which reply is more polite?"),
    ],
)
def test_parse_draft_keeps_the_question(continuation, question):
    assert parse_draft(continuation) == (question, None)


@pytest.mark.parametrize(
    ("continuation", "why"),
    [
        (" is better because", "no question mark on the first line"),
        (" is better.\nWhich one?", "no question mark on the first line"),
        ("?", "too short"),
        ("", "no question mark on the first line"),
        (" " + "very " * 40 + "good?", "longer than 30 words"),
    ],
)
def test_parse_draft_refuses_what_is_no_question(continuation, why):
    q, reason = parse_draft(continuation)
    assert q is None and reason.startswith(why)


def test_parse_question_strips_list_marks_and_quotes():
    assert parse_question('1. "which response is kinder?"') == ("Which response is kinder?", None)
    assert parse_question("- **Which reply is safer?**") == ("Which reply is safer?", None)


def test_candidates_from_a_constitution_and_a_text_file(tmp_path):
    general = read_candidates(ROOT / "constitutions" / "general.yaml")
    c = load_constitution(ROOT / "constitutions" / "general.yaml")
    assert [q for q, _ in general] == [p.comparison_question for p in c.principles]
    assert general[0][1] == {
        "kind": "candidates",
        "file": str(ROOT / "constitutions/general.yaml"),
        "principle": c.principles[0].id,
    }
    txt = tmp_path / "c.txt"
    txt.write_text("# mine\n\nWhich reply mentions blue?\n  which reply is shorter?\n", encoding="utf-8")
    assert read_candidates(txt) == [
        ("Which reply mentions blue?", {"kind": "candidates", "file": str(txt), "line": 3}),
        ("Which reply is shorter?", {"kind": "candidates", "file": str(txt), "line": 4}),
    ]
    txt.write_text("Which reply mentions blue?\nBe nice.\n", encoding="utf-8")
    with pytest.raises(DeriveError, match="line 2: not a comparison question"):
        read_candidates(txt)
    merged = pool([("Which reply is X?", {"a": 1}), ("which  reply is x?", {"b": 2}), ("Which reply is Y?", {})])
    assert [(c.question, c.also_from) for c in merged] == [("Which reply is X?", [{"b": 2}]), ("Which reply is Y?", [])]


# -- scoring -------------------------------------------------------------------------------------
def test_wilson_interval_on_hand_values():
    # 8 of 10: p = 0.8, z = 1.96 → (0.4902, 0.9433) (Wilson 1927; e.g. Agresti and Coull 1998)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_score_counts_pairs_the_principle_reconstructs():
    pairs = _pairs(planted_rows(10))
    blue = Candidate("Which reply mentions blue?", {"kind": "x"})
    other = Candidate("Which reply is kinder?", {"kind": "x"})
    engine = RuleEngine([])
    score(engine, blue, pairs, seed=0)
    score(engine, other, pairs, seed=0)
    # blue: the 8 blue pairs, both orders → p(chosen) = 0.9; the 2 please pairs: A both times → 0.5
    assert (blue.hits, blue.n, blue.invalid, blue.accuracy) == (8, 10, 0, 0.8)
    assert blue.mean_p_chosen == pytest.approx((8 * 0.9 + 2 * 0.5) / 10)
    assert (other.hits, other.mean_p_chosen) == (0, pytest.approx(0.5))


# -- the command ---------------------------------------------------------------------------------
def _run(tmp_path, engine, **kw):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [*planted_rows(40), {"prompt": "x", "chosen": "a"}])
    return derive(prefs, tmp_path / "out" / "derived.yaml", engine=engine, clusters=2, seed=0, **kw)


def test_derive_keeps_the_planted_principle_with_provenance(tmp_path):
    cands = tmp_path / "cands.txt"
    cands.write_text("Which reply is kinder?\nWhich reply mentions please?\n", encoding="utf-8")
    engine = RuleEngine([" mentions blue?", " is nicer because"])
    result = _run(tmp_path, engine, candidates=cands, k=1)
    assert (result.pairs, len(result.rejects), result.train, result.held_out) == (40, 1, 28, 12)
    # the drafting prompts show each cluster's telling words
    assert any("preferred replies: blue" in p for p in engine.draft_prompts)
    assert [d["question"] for d in result.drafts] == ["Which reply mentions blue?", None]
    c = load_constitution(result.output)
    assert [p.id for p in c.principles] == ["derived-1"]
    held = split_held_out([f"p{i}" for i in range(40)], 0.3, 0)[1]
    n_blue = sum(1 for i in held if int(i[1:]) % 4 != 3)
    n_please = len(held) - n_blue
    raw = yaml.safe_load(result.output.read_text())
    top = raw["principles"][0]
    best = max(n_blue, n_please)
    question = "Which reply mentions blue?" if n_blue >= n_please else "Which reply mentions please?"
    assert top["comparison_question"] == question and top["category"] == "derived"
    prov = top["provenance"]
    assert prov["hits"] == best and prov["n_held_out"] == 12 and prov["accuracy"] == round(best / 12, 4)
    assert prov["ci"] == [round(x, 4) for x in wilson_interval(best, 12)]
    assert top["weight"] == prov["accuracy"]
    if question.endswith("blue?"):
        assert prov["source"]["kind"] == "draft" and prov["source"]["cluster"] in (0, 1)
        assert len(prov["source"]["pair_ids"]) == 3 and all(int(i[1:]) % 4 != 3 for i in prov["source"]["pair_ids"])
    else:
        assert prov["source"] == {"kind": "candidates", "file": str(cands), "line": 2}
    assert raw["provenance"]["pairs"] == {"read": 41, "used": 40, "train": 28, "held_out": 12}
    assert raw["provenance"]["drafts"] == {"asked": 2, "parsed": 1}
    # every candidate, scored, and the unparsed draft
    rows = [json.loads(x) for x in (tmp_path / "out" / "derived.yaml.candidates.jsonl").read_text().splitlines()]
    scored = {r["question"]: r for r in rows if r["question"]}
    assert set(scored) == {"Which reply mentions blue?", "Which reply is kinder?", "Which reply mentions please?"}
    assert scored["Which reply mentions blue?"]["hits"] == n_blue
    assert scored["Which reply mentions please?"]["hits"] == n_please
    assert scored["Which reply is kinder?"]["hits"] == 0 and scored["Which reply is kinder?"]["kept_as"] is None
    assert [r["unparsed"] for r in rows if not r["question"]] == ["no question mark on the first line"]
    rejects = (tmp_path / "out" / "derived.yaml.rejects.jsonl").read_text().splitlines()
    assert [json.loads(x)["reason"] for x in rejects] == [
        "needs 'chosen' and 'rejected' (an unlabelled pair has neither)"
    ]
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_nothing_is_written_when_no_candidate_beats_chance(tmp_path):
    with pytest.raises(DeriveError, match="no candidate reconstructs more than --min-accuracy 0.5"):
        _run(tmp_path, RuleEngine([" is nicer?"]))
    assert not (tmp_path / "out" / "derived.yaml").exists()
    with pytest.raises(DeriveError, match="none of the 2 drafts parsed"):
        _run(tmp_path, RuleEngine(["nope"]))
    with pytest.raises(DeriveError, match="--held-out is a fraction"):
        _run(tmp_path, RuleEngine([" is x?"]), held_out=1.0)


def test_cli_derives_and_validates(tmp_path, capsys, monkeypatch):
    import cai_ray.engine

    asked = []

    def fake(section, **kw):
        asked.append((section.backend, section.model, section.dtype))
        return RuleEngine([" mentions blue?", " mentions please?"])

    monkeypatch.setattr(cai_ray.engine, "engine_from_section", fake)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", planted_rows(40))
    out = tmp_path / "d.yaml"
    argv = ["constitution", "derive", "--prefs", str(prefs), "--output", str(out), "--clusters", "2", "--k", "2"]
    assert main([*argv, "--name", "mine", "--min-accuracy", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "drafts:     2 asked, 2 parsed, 0 unparsed" in printed and "derived-1" in printed
    assert "derived-2" in printed and f"wrote:      {out} (mine 1.0.0, 2 principles" in printed
    assert asked == [("hf", "smollm2", "float32")]
    assert main(["constitution", "validate", str(out)]) == 0
    assert main([*argv, "--min-accuracy", "0.99"]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert main([*argv[:-4], "--clusters", "0"]) == 2
    assert "give --candidates" in capsys.readouterr().err


def test_derive_module_names_its_engine_in_provenance(tmp_path):
    result = _run(tmp_path, RuleEngine([" mentions blue?", " mentions please?"]))
    raw = yaml.safe_load(result.output.read_text())
    assert raw["provenance"]["engine"]["model"] == "rule-engine"
    assert raw["provenance"]["sources"]["prefs_sha256"] == sha256_of(tmp_path / "prefs.jsonl")


def test_measured_contrasts_by_hand():
    from cai_ray.collective.contrasts import contrasts

    chosen = ["Here is how.", "Sure, step one.", "OK, I can help.", "Fine?"]
    rejected = ["HERE IS HOW.", "SURE, STEP ONE.", "I'm sorry, but I can't help with that.", "FINE"]
    found = {(c.feature, c.direction): c for c in contrasts(chosen, rejected, min_share=0.75)}
    # capitals: fewer in chosen in pairs 1, 2, 4 (pair 3: 3 of 10 letters vs 2 of 27, more) = 3 of 4
    assert found["capitals", "less"].share == 0.75
    assert found["capitals", "less"].question == "Which reply uses fewer capital letters?"
    assert ("refusal", "less") not in found  # only one pair in four has a refusal
    assert ("questions", "more") not in found
    assert [c.feature for c in contrasts(chosen, rejected, min_share=0.25) if c.direction == "less"][:1] == ["capitals"]
    assert contrasts([], []) == []


class CapsEngine(RuleEngine):
    """Follows "fewer capital letters" (picks the reply with fewer capitals); else answers (A)."""

    def choice_logprobs(self, convs, choices):
        out = []
        for conv in convs:
            text = conv[-2]["content"]
            a, b = re.findall(r"<reply>\n(.*?)\n</reply>", text, re.S)
            caps = "fewer capital letters" in text
            pick_a = sum(ch.isupper() for ch in a) < sum(ch.isupper() for ch in b) if caps else True
            out.append([math.log(0.9), math.log(0.1)] if pick_a else [math.log(0.1), math.log(0.9)])
        return out


def test_a_measured_contrast_is_a_candidate_and_a_hint_to_the_drafts(tmp_path):
    rows = [
        {
            "id": f"c{i}",
            "prompt": f"Tips for {t}?",
            "chosen": f"Go slowly with {t}.",
            "rejected": f"GO SLOWLY WITH {t.upper()}.",
        }
        for i, t in enumerate(TOPICS * 2)
    ]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
    engine = CapsEngine([" is more polite?"])
    result = derive(prefs, tmp_path / "d.yaml", engine=engine, clusters=1, k=1, seed=0)
    assert any("the preferred reply has less capitals in 100% of pairs" in p for p in engine.draft_prompts)
    top = yaml.safe_load(result.output.read_text())["principles"][0]
    assert top["comparison_question"] == "Which reply uses fewer capital letters?"
    assert top["provenance"]["source"] == {"kind": "contrast", "feature": "capitals", "direction": "less", "share": 1.0}
    assert top["provenance"]["accuracy"] == 1.0
    # off above 1: the drafts alone, and the model's "more polite" reconstructs nothing here
    with pytest.raises(DeriveError, match="no candidate reconstructs"):
        derive(prefs, tmp_path / "e.yaml", engine=CapsEngine([" is more polite?"]), clusters=1, k=1, min_contrast=1.5)
