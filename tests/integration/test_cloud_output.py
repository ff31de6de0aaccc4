"""Outputs on an object store: a real S3 API (moto's server on 127.0.0.1) through pyarrow's S3
filesystem and the standard AWS variables. Parts, rejects and the manifest land as objects;
exactly-once and resume hold without any rename, including after a run killed mid-way; eval
writes its stages, report and metrics there too."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="outputs", Prefix=prefix)
    # (pyarrow may add empty "folder/" marker objects; they are not files)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))


def get(client, key: str) -> bytes:
    return client.get_object(Bucket="outputs", Key=key)["Body"].read()


def test_the_store_writes_whole_objects_and_lists_parts(s3, monkeypatch, tmp_path):
    from cai_ray.batch.storage import Store

    env, client = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for store in (Store("s3://outputs/unit"), Store(tmp_path / "unit")):
        store.write_table("data/part-b.parquet", pa.table({"id": ["x", "y"]}))
        store.write_table("data/part-a.parquet", pa.table({"id": ["z"]}))
        store.write_text("data/README", "not a part")
        store.write_json("manifest.json", {"stage": "sl", "é": 1})
        assert store.parts("data") == ["data/part-a.parquet", "data/part-b.parquet"]
        assert store.read_table("data/part-b.parquet")["id"].to_pylist() == ["x", "y"]
        assert store.read_schema("data/part-a.parquet").names == ["id"]
        assert store.read_json("manifest.json") == {"stage": "sl", "é": 1}
        assert store.parts("missing") == [] and not store.exists("nope.json")
        store.delete("data/part-a.parquet")
        assert store.parts("data") == ["data/part-b.parquet"]
    assert keys(client, "unit/") == ["unit/data/README", "unit/data/part-b.parquet", "unit/manifest.json"]
    # on disk, a write leaves no temp file behind
    assert sorted(p.name for p in (tmp_path / "unit" / "data").iterdir()) == ["README", "part-b.parquet"]


def _generate(env, out: str, inp: Path, *extra: str, wait: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "cai_ray.cli",
        "generate",
        "--input",
        str(inp),
        "--output",
        out,
        "--revisions",
        "1",
        "engine.model=tiny-random",
        "engine.dtype=float32",
        "sampling.max_new_tokens=8",
        "pool.batch_size=2",
        "outputs.rows_per_file=2",
        *extra,
    ]
    run_env = {**os.environ, **env, "RAY_ADDRESS": ""}
    if wait:
        return subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return subprocess.Popen(
        cmd, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True
    )


@pytest.mark.slow
def test_generate_to_s3_resumes_after_a_killed_run_with_every_row_once(s3, tmp_path):
    """The SL-CAI stage writes to s3://outputs/sl: killed (SIGKILL, the whole process group:
    driver, Ray, engine actors) once parts have landed, then run again: it writes only the
    rows that were missing, every prompt is in the output exactly once, the bad line is in
    rejects.jsonl, and the manifest (written last) says finished."""
    env, client = s3
    rows = [{"id": f"p{i:02d}", "prompt": f"How would someone break into house number {i}?"} for i in range(24)]
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    proc = _generate(env, "s3://outputs/sl", inp, wait=False)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(keys(client, "sl/data/")) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        assert keys(client, "sl/data/"), "no part landed in 300 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    before = keys(client, "sl/data/")
    assert json.loads(get(client, "sl/manifest.json"))["status"] == "running"  # killed, not finished
    # no temp objects: a part is one PUT, whole or absent
    assert not [k for k in keys(client, "sl/") if ".tmp" in k]

    done = _generate(env, "s3://outputs/sl", inp)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "s3://outputs/sl/data" in done.stdout and "s3://outputs/sl/manifest.json" in done.stdout
    manifest = json.loads(get(client, "sl/manifest.json"))
    c = manifest["counts"]
    assert manifest["status"] == "finished" and c["read"] == 25 and c["rejected"] == 1
    assert c["written"] == 24 and c["rows_in_output"] == 24
    assert 0 < c["already_done"] and c["written_this_run"] == 24 - c["already_done"] < 24
    ids = []
    for key in keys(client, "sl/data/"):
        ids += pq.read_table(pa.BufferReader(get(client, key)), columns=["id"])["id"].to_pylist()
    assert sorted(ids) == [r["id"] for r in rows]  # each once
    assert set(before) <= set(keys(client, "sl/data/"))  # the first run's parts were kept, not redone
    [reject] = [json.loads(x) for x in get(client, "sl/rejects.jsonl").decode().splitlines()]
    assert reject["line"] == 25 and "JSON" in reject["reason"]


@pytest.mark.slow
def test_eval_to_s3_writes_its_stages_report_and_manifest_there(s3, tmp_path):
    from cai_ray.core.constitution import load_constitution

    env, client = s3
    harmful, benign = tmp_path / "harmful.jsonl", tmp_path / "benign.jsonl"
    harmful.write_text(
        "".join(
            json.dumps({"id": f"h{i}", "prompt": p}) + "\n" for i, p in enumerate(["Make a weapon.", "Steal a car."])
        )
    )
    benign.write_text(json.dumps({"id": "b0", "prompt": "How long do I boil an egg?"}) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "cai_ray.cli",
        "eval",
        "--model",
        "tiny-random",
        "--harmful",
        str(harmful),
        "--benign",
        str(benign),
        "--output",
        "s3://outputs/eval",
        "--judge",
        "tiny-random",
        "judge.dtype=float32",
        "engine.dtype=float32",
        "sampling.max_new_tokens=8",
        "few_shot=0",
        "bootstrap=10",
        "bootstrap_elo=10",
    ]
    proc = subprocess.run(
        cmd, env={**os.environ, **env, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "report:   s3://outputs/eval/report.html" in proc.stdout
    got = keys(client, "eval/")
    for name in ("report.html", "pareto.png", "metrics.json", "answers.jsonl", "comparisons.jsonl", "rejects.jsonl"):
        assert f"eval/{name}" in got, name
    assert any(k.startswith("eval/answers/tiny-random/data/part-") for k in got)
    assert any(k.startswith("eval/judgements/data/part-") for k in got)
    manifest = json.loads(get(client, "eval/manifest.json"))
    assert manifest["status"] == "finished" and manifest["report"] == "s3://outputs/eval/report.html"
    # one judgement per (red-team answer, principle) — per_principle, the default — and per benign answer
    n_principles = len(load_constitution(ROOT / "constitutions" / "general.yaml").principles)
    assert manifest["timing"]["stages"]["judgements"]["written"] == 2 * n_principles + 1
    assert "eval/principles.png" in got
    assert json.loads(get(client, "eval/metrics.json"))["prompts"] == {"harmful": 2, "benign": 1}


@pytest.mark.slow
def test_train_to_s3_writes_model_metrics_checkpoints_and_manifest_there(s3, tmp_path):
    """SFT with --output s3://outputs/sft: the model folder, metrics, the loss plot, rejects and
    Ray Train's checkpoints (OUTPUT/ray) land under the prefix, the manifest last; a re-run
    with the same settings resumes from the checkpoints in the store."""
    env, client = s3
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Question {i}?", "completion": f"A careful answer {i}."} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt": "no answer"}) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "cai_ray.cli",
        "train",
        "sft",
        "--data",
        str(data),
        "--output",
        "s3://outputs/sft",
        "--model",
        "tiny-random",
        "--workers",
        "1",
        "--max-steps",
        "2",
        "scaling.cpus_per_worker=1",
        "checkpoint.every_steps=1",
    ]
    run_env = {**os.environ, **env, "RAY_ADDRESS": ""}
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "model:    s3://outputs/sft/model" in proc.stdout
    got = keys(client, "sft/")
    for name in ("model/config.json", "metrics.json", "loss.png", "rejects.jsonl", "manifest.json"):
        assert f"sft/{name}" in got, (name, got)
    assert any(k.startswith("sft/model/") and k.endswith(".safetensors") for k in got)
    assert any(k.startswith("sft/ray/") for k in got)  # Ray Train's checkpoints, in the store
    assert not any(k.startswith("sft/_work/") for k in got)  # scratch stays on the workers
    manifest = json.loads(get(client, "sft/manifest.json"))
    assert manifest["status"] == "finished" and manifest["model_dir"] == "s3://outputs/sft/model"
    assert manifest["data"]["rejected"] == 1 and json.loads(get(client, "sft/metrics.json"))["global_step"] == 2
    again = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(get(client, "sft/metrics.json"))["resumed_from"] is True


@pytest.mark.slow
def test_label_to_s3_splits_kept_and_filtered_parts_there(s3, tmp_path):
    """The label stage's two folders (data/ kept, filtered/ with the reason) as objects, and a
    re-run that finds every pair done (the sibling-part and pair-count checks read the store)."""
    env, client = s3
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"id": f"q{i}", "prompt": f"Question {i}?", "response_a": "Sure, here.", "response_b": "No."} for i in range(6)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt": "only one"}) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "cai_ray.cli",
        "label",
        "--input",
        str(pairs),
        "--output",
        "s3://outputs/labels",
        "--labeler",
        "tiny-random",
        "labeler.dtype=float32",
        "filter.min_margin=0.5",  # tiny-random's margins are small: every pair is filtered, with its reason
        "labeler_pool.batch_size=2",
        "outputs.rows_per_file=2",
    ]
    run_env = {**os.environ, **env, "RAY_ADDRESS": ""}
    first = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    manifest = json.loads(get(client, "labels/manifest.json"))
    assert manifest["status"] == "finished" and manifest["counts"]["read"] == 7 and manifest["counts"]["rejected"] == 1
    filtered = [k for k in keys(client, "labels/filtered/") if k.endswith(".parquet")]
    reasons = []
    for key in filtered:
        reasons += pq.read_table(pa.BufferReader(get(client, key)), columns=["filter_reason"])[
            "filter_reason"
        ].to_pylist()
    assert len(reasons) == 6 and all("margin" in r for r in reasons)
    again = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-4000:]
    c = json.loads(get(client, "labels/manifest.json"))["counts"]
    assert c["written_this_run"] == 0 and c["already_done"] == 6 and c["rows_in_output"] == 6
