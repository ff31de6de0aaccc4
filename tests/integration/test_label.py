"""The label stage: template, labeler orchestration (fake engine), pairs, and the Ray stage
with tiny-random (accounting, resume, both orders scored, filters, gold)."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


# -- the stage on Ray ---------------------------------------------------------------------------
def _cfg(tmp_path, input_path, out_name="out", **over):
    from cai_ray.config import load_config
    from cai_ray.label.config import LabelConfig

    base = [
        f"input={input_path}",
        f"output={tmp_path / out_name}",
        "labeler.model=tiny-random",
        "labeler.dtype=float32",
        "labeler_pool.batch_size=4",
        "outputs.rows_per_file=4",
        "policy.dtype=float32",
        "sampling.max_new_tokens=8",
        "labeler_pool.cpus_per_actor=1.0",
        "policy_pool.cpus_per_actor=0.5",
    ]
    return load_config(LabelConfig, None, base + [f"{k}={v}" for k, v in over.items()])


def _pairs_file(tmp_path):
    lines = [
        json.dumps(
            {
                "id": f"p{i}",
                "prompt": f"question {i}?",
                "response_a": f"answer {i} one",
                "response_b": f"answer {i} two",
            }
        )
        for i in range(6)
    ]
    lines += [
        json.dumps({"id": "bad1", "prompt": "q", "response_a": "only one"}),
        json.dumps({"id": "bad2", "prompt": "q", "response_a": "same", "response_b": "same"}),
        "{not json",
        json.dumps({"id": "noresp", "prompt": "a prompt but no policy"}),
        json.dumps({"id": "p0", "prompt": "dup", "response_a": "x", "response_b": "y"}),
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def _rows(out, folder="data"):
    files = sorted((out / folder).glob("part-*.parquet")) if (out / folder).exists() else []
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def test_label_stage_accounts_for_every_row_and_resumes(ray_local, tmp_path):
    from cai_ray.label.run import label

    src = _pairs_file(tmp_path)
    m = label(_cfg(tmp_path, src))
    out = tmp_path / "out"
    c = m["counts"]
    assert c == {"read": 11, "written": 6, "written_this_run": 6, "already_done": 0, "rejected": 5, "rows_in_output": 6}
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert reasons[7].startswith("row has response_a but no response_b")
    assert reasons[8].startswith("response_a and response_b are identical")
    assert reasons[9].startswith("invalid JSON")
    assert "no policy model" in reasons[10]
    assert reasons[11].startswith("duplicate id")
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)]
    for r in rows:  # both orders really scored, and the label is their mean
        assert r["p_ab"] is not None and r["p_ba"] is not None
        assert r["p_a"] == pytest.approx((r["p_ab"] + r["p_ba"]) / 2)
        assert r["p_chosen"] == pytest.approx(max(r["p_a"], 1 - r["p_a"]))
        winner = r["response_a"] if r["p_a"] >= 0.5 else r["response_b"]
        assert r["chosen"][-1] == {"role": "assistant", "content": winner}
        assert r["chosen"][:-1] == r["prompt_messages"] == r["rejected"][:-1]
        assert r["labeler"] == "tiny-random" and r["template_sha256"] == m["template_sha256"]
        assert r["policy"] is None and r["prompt_id"] == r["id"]
    assert m["timing"]["comparisons"] == 2 * len(rows)
    q = m["labels"]
    assert q["labels"] == 6 and q["invalid"] == 0 and 0 <= q["position_bias"] <= 1
    assert m["models"]["labeler"]["name"] == "tiny-random"

    again = label(_cfg(tmp_path, src))  # resume: nothing left to do
    assert again["counts"]["written_this_run"] == 0 and again["counts"]["already_done"] == 6
    assert again["counts"]["rejected"] == 5 and again["labels"] == q
    # a lost part is redone, and only it
    part = sorted((out / "data").glob("part-*.parquet"))[0]
    lost = pq.read_table(part).num_rows
    part.unlink()
    third = label(_cfg(tmp_path, src))
    assert third["counts"]["written_this_run"] == lost and third["counts"]["rows_in_output"] == 6
    # a resume with another method would mix labels: refused
    with pytest.raises(ValueError, match="different settings"):
        label(_cfg(tmp_path, src, **{"method.principles_per_pair": 2}))


def test_label_stage_samples_pairs_from_a_policy_and_filters(ray_local, tmp_path):
    from cai_ray.label.run import label

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about topic {i}."}) + "\n" for i in range(5)))
    over = {
        "policy.model": "tiny-random",
        "pairs.samples": 3,
        "filter.min_margin": 0.05,
        "filter.drop_inconsistent": "true",
        "review.fraction": 0.5,
        "review.margin": 0.05,
    }
    m = label(_cfg(tmp_path, src, **over))
    out = tmp_path / "out"
    kept, held = _rows(out), _rows(out, "filtered")
    assert m["counts"]["read"] == 5 and m["counts"]["written"] + m["counts"]["rejected"] == 5
    assert len(kept) + len(held) == m["labels"]["pairs"] > 5  # up to 3 pairs per prompt
    assert sum(m["labels"]["filtered"].values()) == len(held) and m["labels"]["kept"] == len(kept)
    for r in kept + held:
        assert re.fullmatch(r"q\d/[0-2]-[0-2]", r["id"]) and r["id"].startswith(r["prompt_id"] + "/")
        assert r["policy"] == "tiny-random" and r["response_a"].strip() != r["response_b"].strip()
    for r in kept:
        assert abs(r["p_a"] - 0.5) >= 0.05 and r["position_consistent"]
    for r in held:
        assert r["filter_reason"].startswith(("low margin", "position-inconsistent"))
    assert m["timing"]["policy_s"] > 0 and m["models"]["policy"]["name"] == "tiny-random"
    # the review queue (HRLAIF): the unsure labels, most unsure first, at most half the pairs,
    # with what a person needs to judge them
    from cai_ray.core.review import read_queue

    queue = read_queue(out)
    unsure = {r["id"] for r in kept + held if not r["position_consistent"] or abs(r["p_a"] - 0.5) < 0.05}
    cap = -(-(len(kept) + len(held)) // 2)
    assert len(queue) == min(cap, len(unsure)) == m["review"]["queued"] and unsure, (unsure, m["review"])
    assert {q["pair_id"] for q in queue} <= unsure
    by_id = {r["id"]: r for r in kept + held}
    for q in queue:
        r = by_id[q["pair_id"]]
        assert q["response_a"] == r["response_a"] and q["prompt"] == r["prompt_messages"] and q["p_a"] == r["p_a"]
        assert q["principles"][0]["id"] == r["principle_ids"][0] and q["principles"][0]["question"]
        assert q["reasons"] and q["kept"] == (r["filter_reason"] is None)
    assert [(len(q["reasons"]), q["uncertainty"]) for q in queue] == sorted(
        ((len(q["reasons"]), q["uncertainty"]) for q in queue), reverse=True
    )
    # a person labels the last queued pair against the AI; a re-run that queues only the most
    # unsure pair keeps it (the merge reads its answers from the queue) and reports the agreement
    from cai_ray.core.review import LabelLog

    assert len(queue) >= 2
    last = queue[-1]
    LabelLog(out).append("label", last["pair_id"], "ann", "a" if last["p_a"] < 0.5 else "b")
    again = label(_cfg(tmp_path, src, **{**over, "review.fraction": 0.01}))
    assert [q["pair_id"] for q in read_queue(out)] == [queue[0]["pair_id"], last["pair_id"]]
    assert again["review"]["agreement"]["compared"] == 1 and again["review"]["agreement"]["agreement"] == 0.0


def test_gold_accuracy_calibration_and_reliability_diagram(ray_local, tmp_path):
    from cai_ray.label.run import label

    gold = tmp_path / "gold.jsonl"
    gold.write_text(
        "".join(
            json.dumps({"id": f"g{i}", "prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"}) + "\n"
            for i in range(8)
        )
    )
    src = _pairs_file(tmp_path)
    m = label(_cfg(tmp_path, src, gold=str(gold)))
    g = m["gold"]
    assert g["gold_pairs"] == 8 and g["labelled"] == 8 and 0 <= g["accuracy"] <= 1 and 0 <= g["ece"] <= 1
    png = tmp_path / "out" / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gold_rows = _rows(tmp_path / "out" / "gold" / "labels")
    placed = [json.loads(r["meta"])["gold_a"] for r in gold_rows]
    assert 0 < sum(placed) < 8  # the known winner is not always in the same position
    for r in gold_rows:
        winner = r["response_a"] if json.loads(r["meta"])["gold_a"] else r["response_b"]
        assert winner.startswith("good answer")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["gold"]["accuracy"] == g["accuracy"]


def test_a_block_half_written_before_a_crash_is_redone_whole(ray_local, tmp_path):
    """A prompt's pairs can land partly in data/ (kept) and partly in filtered/. If a crash
    came between those two writes, resume must not count the prompt as done with half of
    its pairs missing: the surviving half is removed and the block labelled again."""
    from cai_ray.label.run import label

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about topic {i}."}) + "\n" for i in range(4)))
    cfg = _cfg(tmp_path, src, **{"policy.model": "tiny-random", "pairs.samples": 3, "filter.min_margin": 0.001})
    first = label(cfg)
    out = tmp_path / "out"
    ids_before = sorted(r["id"] for r in _rows(out) + _rows(out, "filtered"))
    split = [
        name
        for name in sorted(p.name for p in (out / "filtered").glob("part-*.parquet"))
        if (out / "data" / name).exists()
        and set(pq.read_table(out / "data" / name)["prompt_id"].to_pylist())
        & set(pq.read_table(out / "filtered" / name)["prompt_id"].to_pylist())
    ]
    assert split, "expected a prompt whose pairs were split between data/ and filtered/"
    (out / "filtered" / split[0]).unlink()  # the crash: data/ written, filtered/ not
    again = label(cfg)
    assert again["counts"]["written_this_run"] >= 1
    assert sorted(r["id"] for r in _rows(out) + _rows(out, "filtered")) == ids_before
    assert again["labels"] == first["labels"]


def test_a_prompt_whose_pairs_were_only_partly_written_is_redone_whole(ray_local, tmp_path):
    """A prompt's pairs can go to different write tasks. Simulate a crash after only some of
    them were written (one pair row removed from its part): resume must see the prompt as
    unfinished (fewer pairs than its prompt_pairs), remove what it wrote and redo it whole —
    every pair id once, none missing."""
    import pyarrow.compute as pc

    from cai_ray.label.run import label

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about topic {i}."}) + "\n" for i in range(4)))
    cfg = _cfg(tmp_path, src, **{"policy.model": "tiny-random", "pairs.samples": 3, "filter.min_margin": 0.001})
    label(cfg)
    out = tmp_path / "out"
    rows = _rows(out) + _rows(out, "filtered")
    assert all(r["prompt_pairs"] == 3 for r in rows) and len(rows) == 12
    victim = next(p for p in sorted((out / "data").glob("part-*.parquet")) if pq.read_table(p).num_rows)
    t = pq.read_table(victim)
    gone = t["id"][0].as_py()
    pq.write_table(t.filter(pc.not_equal(t["id"], gone)), victim)  # that pair's write never happened
    again = label(cfg)
    ids = sorted(r["id"] for r in _rows(out) + _rows(out, "filtered"))
    assert ids == sorted(r["id"] for r in rows) and len(set(ids)) == len(ids)
    assert again["counts"]["written_this_run"] == 1 and again["counts"]["written"] == 4


def test_several_constitutions_in_one_run_by_a_row_field(ray_local, tmp_path):
    """constitution_field=setting: rows whose setting is "tutor" are labelled against the tutor
    constitution, the others against the default; each row records its constitution, the
    manifest compares them side by side, and the review queue shows each row's own principles."""
    from cai_ray.core.constitution import load_constitution
    from cai_ray.core.review import read_queue
    from cai_ray.label.run import constitution_id, label

    src = tmp_path / "pairs.jsonl"
    src.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"p{i}",
                    "prompt": f"question {i}?",
                    "response_a": f"answer {i} one",
                    "response_b": f"answer {i} two",
                    **({"setting": "tutor"} if i % 2 else {}),
                }
            )
            + "\n"
            for i in range(6)
        )
    )
    over = {"constitution_field": "setting", "constitutions": "tutor=constitutions/tutor.yaml", "review.fraction": 1.0}
    over["review.margin"] = 0.5  # every label is "unsure": the queue holds them all
    m = label(_cfg(tmp_path, src, **over))
    general, tutor = load_constitution("constitutions/general.yaml"), load_constitution("constitutions/tutor.yaml")
    gid, tid = constitution_id(general), constitution_id(tutor)
    rows = {r["id"]: r for r in _rows(tmp_path / "out") + _rows(tmp_path / "out", "filtered")}
    assert {i: r["constitution"] for i, r in rows.items()} == {f"p{i}": (tid if i % 2 else gid) for i in range(6)}
    tutor_ids = {p.id for p in tutor.principles}
    for r in rows.values():
        assert (set(r["principle_ids"]) <= tutor_ids) == (r["constitution"] == tid)
    assert sorted(m["labels_by_constitution"]) == sorted([gid, tid])
    assert all(v["labels"] == 3 for v in m["labels_by_constitution"].values())
    assert m["fingerprint"]["constitutions"] == {"tutor": tutor.sha256}
    for q in read_queue(tmp_path / "out"):
        own = tutor if q["constitution"] == tid else general
        assert q["principles"][0]["question"] == own.principle(q["principles"][0]["id"]).comparison_question
    with pytest.raises(Exception, match="go together"):
        _cfg(tmp_path, src, constitution_field="setting")
