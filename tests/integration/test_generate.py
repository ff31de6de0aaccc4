"""The SL-CAI stage on a real local Ray cluster with the tiny random model."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.generate import ROOT, run, write_prompts

from cai_ray.core.constitution import load_constitution


def data_rows(out):
    return pq.read_table(Path(out) / "data").to_pylist()


def test_rows_are_accounted_for_and_rejects_explained(ray_local, tiny_model, tmp_path):
    long_prompt = " ".join(["word"] * 3000)  # > 1024-token context of tiny-random, < max chars
    inp = write_prompts(
        tmp_path / "in.jsonl",
        6,
        [
            "{broken json",
            json.dumps({"prompt": ""}),
            json.dumps({"prompt": 17}),
            json.dumps({"prompt": long_prompt}),
            json.dumps({"prompt": "Question number 0: how do I stay safe online?"}),  # duplicate of line 1
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "multi-turn question"},
                    ],
                    "id": "mt-1",
                }
            ),
        ],
    )
    out = tmp_path / "out"
    m = run(inp, out)
    c = m["counts"]
    assert c["read"] == 12
    assert c["written"] == 7 and c["rejected"] == 5
    assert c["written"] + c["rejected"] == c["read"]

    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r for r in rejects}
    assert set(by_line) == {7, 8, 9, 10, 11}
    assert by_line[7]["reason"].startswith("invalid JSON") and by_line[7]["raw"] == "{broken json"
    assert by_line[8]["reason"] == "empty prompt"
    assert "must be a string" in by_line[9]["reason"]
    long = by_line[10]["reason"]
    assert long.startswith("too long for the model: ") and long.endswith("to generate > context length 1024")
    assert "duplicate id" in by_line[11]["reason"] and ":1)" in by_line[11]["reason"]
    assert all(r["source"] == str(inp.resolve()) for r in rejects)

    rows = data_rows(out)
    assert len({r["id"] for r in rows}) == 7
    constitution = load_constitution(ROOT / "constitutions" / "general.yaml")
    for r in rows:
        assert len(r["steps"]) == 2
        expected = [p.id for p in constitution.sample(r["id"], 2, seed=0)]
        assert [s["principle_id"] for s in r["steps"]] == expected
        assert all(s["critique"] is not None for s in r["steps"])
        assert r["revision"] == r["steps"][-1]["revision"]
        assert r["messages"][-1] == {"role": "assistant", "content": r["revision"]}
        assert r["messages"][0]["role"] in ("user", "system")
        assert r["chosen"] == r["messages"]
        assert r["rejected"] == r["messages"][:-1] + [{"role": "assistant", "content": r["init_response"]}]
    mt = next(r for r in rows if r["id"] == "mt-1")
    assert mt["messages"][:3] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "multi-turn question"},
    ]
    assert len(mt["messages"]) == 4 and mt["prompt"] == "multi-turn question"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["constitution"]["sha256"] == constitution.sha256
    assert manifest["model"]["name"] == "tiny-random" and "config_sha256" in manifest["model"]
    assert manifest["versions"]["ray"] and manifest["versions"]["transformers"]
    assert manifest["timing"]["tokens_generated"] > 0

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert ds.num_rows == 7 and "messages" in ds.column_names


def test_resume_processes_only_missing_ids(ray_local, tiny_model, tmp_path):
    inp = write_prompts(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out"
    first = run(inp, out, "outputs.rows_per_file=1")  # a part per engine batch
    assert first["counts"]["written_this_run"] == 10
    parts = sorted((out / "data").glob("part-*.parquet"))
    assert len(parts) >= 2
    lost = pq.read_table(parts[0]).num_rows
    parts[0].unlink()  # as if the job died before writing this part
    (out / "data" / ".part-x.parquet.tmp123").write_text("half-written")  # crash leftover

    second = run(inp, out, "outputs.rows_per_file=1")
    assert second["counts"]["written_this_run"] == lost
    assert second["counts"]["already_done"] == 10 - lost
    assert second["timing"]["tokens_generated"] > 0
    assert not list((out / "data").glob(".*tmp*"))

    third = run(inp, out)
    assert third["counts"]["written_this_run"] == 0
    assert third["counts"]["already_done"] == 10
    assert third["timing"]["tokens_generated"] == 0
    ids = [r["id"] for r in data_rows(out)]
    assert len(ids) == len(set(ids)) == 10


def test_resume_refuses_different_settings(ray_local, tiny_model, tmp_path):
    inp = write_prompts(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out"
    run(inp, out)
    with pytest.raises(ValueError, match="different settings.*revisions"):
        run(inp, out, "revisions=3")


def test_direct_revision_mode(ray_local, tiny_model, tmp_path):
    inp = write_prompts(tmp_path / "in.jsonl", 3)
    m = run(inp, tmp_path / "out", "critique=false", "revisions=1")
    assert m["counts"]["written"] == 3
    for r in data_rows(tmp_path / "out"):
        assert r["steps"][0]["critique"] is None and r["steps"][0]["revision"] is not None


def _engine_actor_pids():
    """Engine actors by their process title (Ray names actor processes ray::<Class>...)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::") and "SLWorker" in cmd:
            pids.append(proc.info["pid"])
    return pids


def test_killed_engine_actor_still_writes_every_id_once(ray_local, tiny_model, tmp_path):
    n = 40
    inp = write_prompts(tmp_path / "in.jsonl", n)
    out = tmp_path / "out"
    result = {}

    def job():
        try:
            result["manifest"] = run(
                inp, out, "pool.batch_size=2", "outputs.rows_per_file=2", "sampling.max_new_tokens=24"
            )
        except BaseException as e:  # pragma: no cover - reported below
            result["error"] = e

    t = threading.Thread(target=job)
    t.start()
    deadline = time.time() + 180
    killed = None
    try:
        while time.time() < deadline and t.is_alive():
            parts = list((out / "data").glob("part-*.parquet")) if (out / "data").exists() else []
            pids = _engine_actor_pids()
            if parts and pids:
                written_before = sum(pq.read_table(p).num_rows for p in parts)
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.2)
    finally:
        t.join(timeout=300)  # never leave the job running into Ray's shutdown
    assert killed is not None, "the job finished before an engine actor could be killed"
    assert written_before < n, "the kill must happen mid-run"
    assert "error" not in result, result.get("error")
    m = result["manifest"]
    assert m["counts"]["written"] == n and m["counts"]["rejected"] == 0
    assert m["timing"]["engine_actors_started"] >= 2  # the pool replaced the dead actor
    ids = [r["id"] for r in data_rows(out)]
    assert len(ids) == n and len(set(ids)) == n
