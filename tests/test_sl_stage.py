"""The SL-CAI stage on a real local Ray cluster with the tiny random model."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cai_ray.config import GenerateConfig, load_config
from cai_ray.constitution import load_constitution

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "engine.model=tiny-random",
    "engine.dtype=float32",
    "engine.threads=1",
    "sampling.max_new_tokens=8",
    "revisions=2",
    "pool.batch_size=4",
    "outputs.rows_per_file=4",
]


def run(inp, out, *extra):
    from cai_ray.sl import generate

    cfg = load_config(GenerateConfig, None, [f"input={inp}", f"output={out}", *TINY, *extra])
    return generate(cfg)


def write_prompts(path: Path, n: int, extra_lines=()):
    lines = [
        json.dumps({"prompt": f"Question number {i}: how do I stay safe online?", "category": "c"}) for i in range(n)
    ]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


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
    assert "prompt too long for the model" in by_line[10]["reason"]
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


class _FailsOn:
    """Stand-in engine for a control-flow test: the benchmark-only noop engine, except that
    any batch holding a prompt with BOOM raises (as an endpoint answering 400 would)."""

    def __init__(self, inner, broken=False):
        self.inner, self.broken = inner, broken

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, convs, params):
        if self.broken or any("BOOM" in m["content"] for c in convs for m in c):
            raise ValueError("400: the endpoint refused this prompt")
        return self.inner.generate(convs, params)


def test_an_engine_error_on_one_prompt_rejects_that_row_only(tmp_path):
    from cai_ray.datasets import read_local
    from cai_ray.sl import SLWorker

    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(["a", "BOOM", "c"])))
    batch = read_local(str(inp), 1000)
    c = load_constitution(ROOT / "constitutions" / "general.yaml")
    w = SLWorker("noop", {"model": "noop"}, c, 1, True, None, 0, {"temperature": 0.0, "max_new_tokens": 8})
    w.engine = _FailsOn(w.engine)
    out = w(batch).to_pylist()
    assert [r["id"] for r in out] == ["r0", "r1", "r2"]
    assert out[1]["reject_reason"].startswith("the engine failed on this prompt: ValueError: 400")
    assert out[0]["reject_reason"] is None and out[2]["reject_reason"] is None and out[2]["revision"]
    w.engine = _FailsOn(w.engine.inner, broken=True)  # every row fails alone too: the engine is broken
    with pytest.raises(ValueError, match="400"):
        w(batch)


def test_two_runs_into_one_output_folder_are_locked_out(tmp_path):
    """The second run stops at once, saying who holds the folder; the lock goes with its
    holder (an flock), so a crashed run leaves nothing to clean up."""
    from cai_ray.runtime import OutputBusy, output_lock

    inp = tmp_path / "p.jsonl"
    write_prompts(inp, 2)
    with output_lock(tmp_path / "out"):
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
            run(inp, tmp_path / "out")
        with pytest.raises(OutputBusy):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):  # released: free again
        pass
