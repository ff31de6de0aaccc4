"""`cai-ray constitution collect` on a synthetic Polis export with two planted opinion groups.

60 voters in two groups of 30 (a*, b*), 30 statements: 0-9 both groups agree with, 10-16
only group a, 17-23 only group b, 24-29 split inside both groups. Plus two voters with too
few votes, a moderated-out statement everyone agrees with, a re-vote and five bad rows.
"""

import csv
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from cai_ray.cli import main
from cai_ray.collective.collect import collect, principle_id, vote_matrix
from cai_ray.collective.consensus import group_support, select
from cai_ray.collective.opinion_groups import kmeans, opinion_groups, silhouette
from cai_ray.collective.polis import CollectError, read_export
from cai_ray.core.constitution import ConstitutionError, load_constitution, parse_constitution
from cai_ray.core.prompts import comparison_shots, critique_messages, few_shot_turns, user

ROOT = Path(__file__).resolve().parents[2]
CONSENSUS = [str(i) for i in range(10)]
ONLY_A = [str(i) for i in range(10, 17)]
ONLY_B = [str(i) for i in range(17, 24)]
SPLIT = [str(i) for i in range(24, 30)]
HIDDEN = "30"  # moderated out; everyone agrees with it


def _draw(rng, p_agree, p_disagree):
    u = rng.random()
    return 1 if u < p_agree else -1 if u < p_agree + p_disagree else 0


def synthetic(tmp_path: Path):
    """Writes comments.csv and votes.csv; → (paths, final votes {(voter, comment): vote}, group of voter)."""
    rng = random.Random(0)
    group = {f"a{i}": "a" for i in range(30)} | {f"b{i}": "b" for i in range(30)}
    rows, final = [], {}
    t = 1000
    for voter, g in group.items():
        for cid in [*CONSENSUS, *ONLY_A, *ONLY_B, *SPLIT, HIDDEN]:
            if rng.random() > 0.9:
                continue  # not every voter sees every statement
            if cid in CONSENSUS or cid == HIDDEN:
                v = _draw(rng, 0.85, 0.10)
            elif cid in SPLIT:
                v = _draw(rng, 0.45, 0.45)
            elif (cid in ONLY_A) == (g == "a"):
                v = _draw(rng, 0.85, 0.10)
            else:
                v = _draw(rng, 0.05, 0.85)
            t += 1
            rows.append([t, "", cid, voter, v])
            if cid != HIDDEN:
                final[(voter, cid)] = v
    for voter in ("s0", "s1"):  # three votes each: left out of the groups (min-votes 7)
        for cid in ("0", "1", "2"):
            t += 1
            rows.append([t, "", cid, voter, -1])
    # a re-vote: a0 disagreed with statement 0 at t=1, then agreed at t=999999; the later row
    # sits earlier in the file, so only the timestamp says which one wins
    rows = [[999999, "", "0", "a0", 1], *[r for r in rows if r[2:4] != ["0", "a0"]], [1, "", "0", "a0", -1]]
    final[("a0", "0")] = 1
    bad = [
        [5, "", "3", "a1", 2],  # bad vote
        [6, "", "999", "a1", 1],  # unknown comment-id
        [7, "", "3", "", 1],  # missing voter-id
        [8, "", "4", "a2", "yes"],  # bad vote
        ["soon", "", "4", "a3", 1],  # bad timestamp
    ]
    rows[40:40] = bad
    comments = tmp_path / "comments.csv"
    with comments.open("w", encoding="utf-8-sig", newline="") as f:  # with a BOM, as Excel writes
        w = csv.writer(f)
        w.writerow(
            ["timestamp", "datetime", "Comment ID", "author-id", "agrees", "disagrees", "moderated", "comment-body"]
        )
        for cid in [*CONSENSUS, *ONLY_A, *ONLY_B, *SPLIT, HIDDEN]:
            w.writerow(
                [0, "", cid, 0, 0, 0, -1 if cid == HIDDEN else 1, f"Statement {cid}: the AI should  do thing {cid}."]
            )
    votes = tmp_path / "votes.csv"
    with votes.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Timestamp", "datetime", "comment-id", " voter_id ", "vote"])
        w.writerows(rows)
    return comments, votes, final, group


def adjusted_rand(a, b) -> float:
    """Adjusted Rand index of two labellings (Hubert and Arabie 1985)."""
    pairs = lambda n: n * (n - 1) / 2  # noqa: E731
    table = Counter(zip(a, b))
    index = sum(pairs(n) for n in table.values())
    rows = sum(pairs(n) for n in Counter(a).values())
    cols = sum(pairs(n) for n in Counter(b).values())
    expected = rows * cols / pairs(len(a))
    return (index - expected) / ((rows + cols) / 2 - expected)


def test_group_aware_consensus_on_hand_values():
    # one statement, two groups: group 0 has 8 agree / 1 disagree / 1 pass of 10 votes,
    # group 1 has 3 agree / 7 disagree; a second statement both groups agree with
    votes = np.array([[1] * 8 + [-1, 0] + [-1] * 7 + [1] * 3, [1] * 20]).T
    mask = np.ones_like(votes, dtype=bool)
    labels = np.array([0] * 10 + [1] * 10)
    s = group_support(votes, mask, labels, 2)
    assert s.agree[:, 0].tolist() == [8, 3] and s.disagree[:, 0].tolist() == [1, 7]
    assert s.passed[:, 0].tolist() == [1, 0] and s.votes[:, 0].tolist() == [10, 10]
    assert s.p_agree[:, 0] == pytest.approx([9 / 12, 4 / 12])
    assert s.consensus[0] == pytest.approx(9 / 12 * 4 / 12)
    assert s.consensus[1] == pytest.approx((11 / 12) ** 2)
    assert select(s, 0.6, 3, 20) == [1]  # statement 0: group 1 is against it
    assert select(s, 0.3, 3, 20) == [1, 0]  # by consensus
    assert select(s, 0.3, 11, 20) == []  # too few votes in a group
    assert select(s, 0.3, 3, 1) == [1]


def test_kmeans_and_silhouette_on_two_blobs():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (10, 2))])
    labels, _ = kmeans(points, 2, np.random.default_rng(1))
    assert adjusted_rand(labels.tolist(), [0] * 20 + [1] * 10) == 1.0
    assert silhouette(points, labels) > 0.9
    assert silhouette(points, labels, chunk=7) == pytest.approx(silhouette(points, labels))
    assert silhouette(points, np.array([0, 1] * 15)) < 0.1


def test_voters_who_all_vote_alike_are_one_group():
    votes = np.array([[1, -1, 0, 1]] * 6)
    g = opinion_groups(votes, np.ones_like(votes, dtype=bool), max_groups=5)
    assert g.k == 1 and g.labels.tolist() == [0] * 6 and g.silhouettes == {}


def test_principle_ids_are_valid_and_distinct():
    taken: set[str] = set()
    assert [principle_id(c, taken) for c in ("17", "A.1", "a-1", "¿?")] == [
        "ccai-17",
        "ccai-a-1",
        "ccai-a-1-2",
        "ccai-statement",
    ]


def test_reader_keeps_the_last_vote_and_rejects_bad_rows_with_reasons(tmp_path):
    comments, votes, final, _ = synthetic(tmp_path)
    e = read_export(comments, votes)
    assert list(e.statements) == [*CONSENSUS, *ONLY_A, *ONLY_B, *SPLIT]
    assert e.statements["0"] == "Statement 0: the AI should do thing 0."  # spaces collapsed
    assert e.moderated_out == [HIDDEN] and e.on_moderated_out > 0
    assert e.reject_counts() == {"bad vote": 2, "unknown comment-id": 1, "missing voter-id": 1, "bad timestamp": 1}
    assert e.votes[("a0", "0")] == 1 and e.revotes == 1
    assert {k: v for k, v in e.votes.items() if k[0][0] != "s"} == final
    assert len(e.voters) == 62


def test_the_two_planted_groups_are_found(tmp_path):
    comments, votes, _, group = synthetic(tmp_path)
    voters, _, matrix, mask = vote_matrix(read_export(comments, votes))
    rows = mask.sum(1) >= 7
    g = opinion_groups(matrix[rows], mask[rows], max_groups=5, seed=0)
    assert g.k == 2 and max(g.silhouettes, key=g.silhouettes.get) == 2
    truth = [group[v] for v, r in zip(voters, rows) if r]
    assert adjusted_rand(g.labels.tolist(), truth) >= 0.9


def test_collect_keeps_exactly_the_consensus_statements_with_provenance(tmp_path):
    comments, votes, final, group = synthetic(tmp_path)
    out = tmp_path / "c" / "public.yaml"
    result = collect(comments, votes, out)
    c = load_constitution(out)
    assert sorted(p.id for p in c.principles) == sorted(f"ccai-{i}" for i in CONSENSUS)
    assert all(p.category == "collective" for p in c.principles)
    assert "Statement 0: the AI should do thing 0." in c.principle("ccai-0").critique_request
    assert c.principle("ccai-0").critique_request.startswith("Identify ways the assistant's last reply conflicts")

    raw = yaml.safe_load(out.read_text())
    ranked = [p["provenance"]["consensus"] for p in raw["principles"]]
    assert ranked == sorted(ranked, reverse=True)
    assert [p["weight"] for p in raw["principles"]] == ranked
    # statement 0 by hand: the final votes of each planted group (a0's re-vote counted once)
    prov = next(p["provenance"] for p in raw["principles"] if p["id"] == "ccai-0")
    assert prov["statement_id"] == "0"
    by_group = {}
    for g in ("a", "b"):
        vs = [v for (voter, cid), v in final.items() if cid == "0" and group[voter] == g]
        by_group[g] = {"agree": vs.count(1), "disagree": vs.count(-1), "pass": vs.count(0), "votes": len(vs)}
    a_label = int(result.groups.labels[result.export.voters.index("a0")])
    for entry in prov["groups"]:
        want = by_group["a" if entry["group"] == a_label else "b"]
        assert {k: entry[k] for k in want} == want
        assert entry["p_agree"] == pytest.approx((want["agree"] + 1) / (want["votes"] + 2), abs=1e-4)
    p = [e["p_agree"] for e in prov["groups"]]
    assert prov["consensus"] == pytest.approx(p[0] * p[1], rel=1e-3)

    top = raw["provenance"]
    assert top["voters"] == {"total": 62, "clustered": 60, "too_few_votes": 2}
    assert [g["voters"] for g in top["groups"]] == [30, 30]
    assert top["statements"] == {"read": 30, "moderated_out": 1, "kept": 10}
    assert top["votes"]["revotes_replaced"] == 1 and top["rejects"]["rows"] == 5
    assert top["thresholds"]["min_agree"] == 0.6
    lines = [json.loads(x) for x in (tmp_path / "c" / "public.yaml.rejects.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in lines) == {
        "bad vote": 2,
        "unknown comment-id": 1,
        "missing voter-id": 1,
        "bad timestamp": 1,
    }
    assert all(r["file"] == str(votes) and r["line"] > 1 for r in lines)

    # usable where any constitution is: sampling, prompts, no few-shot examples
    assert len(c.sample_distinct("row-1", 3, seed=0)) == 3
    assert comparison_shots(c, None, cot=False) == [] and few_shot_turns(c, 2) == []
    msgs = critique_messages([], [user("hi")], "hello", c.sample("row-1", 1, seed=0)[0])
    assert "the public agreed with" in msgs[-1]["content"]


def test_participants_votes_layout_gives_the_same_constitution(tmp_path):
    comments, votes, _, _ = synthetic(tmp_path)
    e = read_export(comments, votes)
    wide = tmp_path / "participants-votes.csv"
    ids = [*e.statements, "777"]
    with wide.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["participant", "xid", "group-id", "n-comments", "n-votes", "n-agree", "n-disagree", *ids])
        for voter in e.voters:
            w.writerow([voter, "", "", 0, 0, 0, 0, *[e.votes.get((voter, c), "") for c in e.statements], 1])
    long = collect(comments, votes, tmp_path / "long.yaml")
    wide_ = collect(comments, wide, tmp_path / "wide.yaml")
    assert wide_.export.layout == "participants-votes"
    assert wide_.principle_ids == long.principle_ids
    assert wide_.export.reject_counts() == {"unknown comment-id": len(e.voters)}


def test_cli_writes_the_constitution_and_refuses_an_empty_one(tmp_path, capsys):
    comments, votes, _, _ = synthetic(tmp_path)
    out = tmp_path / "public.yaml"
    argv = ["constitution", "collect", "--statements", str(comments), "--votes", str(votes), "--output", str(out)]
    assert main([*argv, "--name", "town-hall"]) == 0
    printed = capsys.readouterr().out
    assert "groups:    2" in printed and "group 0: 30 voters" in printed and "ccai-0" in printed
    assert f"wrote:     {out} (town-hall 1.0.0, 10 principles" in printed and "rejects.jsonl" in printed
    assert main(["constitution", "validate", str(out)]) == 0
    capsys.readouterr()

    empty = tmp_path / "none.yaml"
    argv[-1] = str(empty)
    assert main([*argv, "--min-agree", "0.99"]) == 2
    err = capsys.readouterr().err
    assert "--min-agree 0.99" in err and "--min-group-votes 3" in err and "nothing written" in err
    assert not empty.exists() and not Path(f"{empty}.rejects.jsonl").exists()
    assert not list(tmp_path.glob(".none.yaml*"))

    with pytest.raises(CollectError, match="--max-principles must be at least 1"):
        collect(comments, votes, empty, max_principles=0)

    (tmp_path / "odd.csv").write_text("who,what\n1,2\n")
    argv[5] = str(tmp_path / "odd.csv")
    assert main(argv) == 2
    assert "neither a votes.csv" in capsys.readouterr().err


def test_the_validator_takes_a_provenance_mapping_and_nothing_else():
    raw = yaml.safe_load((ROOT / "constitutions" / "tutor.yaml").read_text())
    raw["provenance"] = {"method": "hand-written"}
    raw["principles"][0]["provenance"] = {"statement_id": "4"}
    assert parse_constitution(raw).principles[0].id == "teach-dont-tell"
    raw["principles"][0]["provenance"] = "a poll"
    raw["provenance"] = ["x"]
    with pytest.raises(ConstitutionError) as e:
        parse_constitution(raw)
    assert "principle 'teach-dont-tell' (#1): field 'provenance': must be a mapping" in str(e.value)
    assert "field 'provenance': must be a mapping, got list" in str(e.value)
