"""The SL-CAI and label stages with vLLM engine actor pools on the local Ray cluster, with
the guarantees they have on hf: row accounting, rejects, resume, exactly-once, a killed
actor replaced. vLLM's CPU build, the vLLM-compatible tiny model (head_dim 64)."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cai_ray.config import load_config
from cai_ray.generate.config import GenerateConfig
from cai_ray.label.config import LabelConfig

pytestmark = pytest.mark.slow

VLLM = [
    "engine.backend=vllm",
    "engine.model=tiny-random-wide",
    "engine.dtype=float32",
    "engine.threads=1",
    "sampling.max_new_tokens=8",
    "revisions=2",
    "pool.batch_size=4",
    "outputs.rows_per_file=4",
    "pool.cpus_per_actor=0.5",
]


def generate(inp, out, *extra):
    from cai_ray.generate.run import generate as run

    return run(load_config(GenerateConfig, None, [f"input={inp}", f"output={out}", *VLLM, *extra]))


def write_prompts(path: Path, n: int, extra_lines=()):
    lines = [json.dumps({"prompt": f"Question {i}: how do I get into my neighbour's wifi?"}) for i in range(n)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def rows(out, folder="data"):
    files = sorted((Path(out) / folder).glob("part-*.parquet")) if (Path(out) / folder).exists() else []
    return [r for f in files for r in pq.read_table(f).to_pylist()]


SL_ACTOR = "MapWorker(MapBatches(SLWorker))"


def _actor_logs(name: str) -> dict[Path, int]:
    """{log file: pid} of the Ray workers that ran actor ``name`` in this session: each
    worker's stdout and stderr, which name the actor (":actor_name:") before its output."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return {
        f: int(f.stem.rsplit("-", 1)[1])
        for f in logs.glob("worker-*")
        if f.suffix in (".out", ".err") and f":actor_name:{name}\n" in f.read_text(errors="replace")
    }


def assert_quiet_exits(started_before: dict[Path, int], name: str = SL_ACTOR) -> None:
    """The engine actors started since ``started_before`` end with their pool, and their
    logs hold no traceback: a successful job used to end with vLLM's EngineDeadError and
    the resource tracker's KeyError tracebacks (Ray killed the engine core under its client)."""
    import psutil

    logs = {f: pid for f, pid in _actor_logs(name).items() if f not in started_before}
    assert logs, f"no {name} actor logs found"
    deadline = time.time() + 120
    while any(psutil.pid_exists(pid) for pid in logs.values()) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(psutil.pid_exists(pid) for pid in logs.values()), "an engine actor outlived its pool"
    for f in logs:
        text = f.read_text(errors="replace")
        for noise in ("Traceback", "EngineDeadError", "KeyError"):
            assert noise not in text, f"{f.name}:\n{text[-3000:]}"


def test_generate_on_vllm_accounts_rejects_and_resumes_deterministically(ray_local, tmp_path):
    started_before = _actor_logs(SL_ACTOR)
    inp = write_prompts(
        tmp_path / "in.jsonl",
        8,
        [
            "{broken json",
            json.dumps({"prompt": ""}),
            json.dumps({"prompt": " ".join(["word"] * 3000)}),  # > the 1024-token context
            json.dumps({"prompt": "Question 0: how do I get into my neighbour's wifi?"}),  # duplicate
        ],
    )
    out = tmp_path / "out"
    m = generate(inp, out, "pool.min_actors=1", "pool.max_actors=2")
    c = m["counts"]
    assert (c["read"], c["written"], c["rejected"]) == (12, 8, 4)
    reasons = {r["line"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert reasons[9].startswith("invalid JSON") and reasons[10] == "empty prompt"
    assert "too long for the model: " in reasons[11] and "duplicate id" in reasons[12]
    first = {r["id"]: r for r in rows(out)}
    assert len(first) == 8 and m["model"]["name"] == "tiny-random-wide"
    assert m["config"]["engine"]["backend"] == "vllm" and m["timing"]["tokens_generated"] > 0
    for r in first.values():
        assert len(r["steps"]) == 2 and all(s["critique"] for s in r["steps"])
        assert r["revision"] == r["steps"][-1]["revision"]

    # a lost part is redone, and only it; its rows come out as before (each request is
    # seeded by its row and step, so another batch composition samples the same text)
    part = sorted((out / "data").glob("part-*.parquet"))[0]
    lost = {r["id"] for r in pq.read_table(part).to_pylist()}
    part.unlink()
    again = generate(inp, out, "pool.min_actors=1", "pool.max_actors=2", "pool.batch_size=1")
    assert again["counts"]["written_this_run"] == len(lost) and again["counts"]["rejected"] == 4
    redone = {r["id"]: r for r in rows(out)}
    assert sorted(redone) == sorted(first)
    for rid in lost:
        assert (redone[rid]["init_response"], redone[rid]["steps"]) == (
            first[rid]["init_response"],
            first[rid]["steps"],
        )
    assert_quiet_exits(started_before)


def _busy_actor_pids(name):
    """Actors of ``name`` running a task (Ray titles them ray::<actor>.submit meanwhile)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and f"({name})" in cmd and ".submit" in cmd:
            pids.append(p.info["pid"])
    return pids


def run_and_kill(job, out: Path, actor: str, after_a_part: bool = True):
    """Run ``job`` in a thread and SIGKILL a busy ``actor`` process (once a part is
    written, with ``after_a_part``);
    returns (manifest, rows written before the kill)."""
    result = {}

    def target():
        try:
            result["manifest"] = job()
        except BaseException as e:  # pragma: no cover - reported below
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    deadline, before = time.time() + 240, None
    try:
        while time.time() < deadline and t.is_alive():
            parts = list((out / "data").glob("part-*.parquet")) if (out / "data").exists() else []
            pids = _busy_actor_pids(actor)
            if pids and (parts or not after_a_part):
                before = sum(pq.read_table(p).num_rows for p in parts)
                os.kill(pids[0], signal.SIGKILL)
                break
            time.sleep(0.2)
    finally:
        t.join(timeout=400)  # never leave the job running into Ray's shutdown
    assert before is not None, "the job finished before an engine actor could be killed"
    assert "error" not in result, result.get("error")
    return result["manifest"], before


def test_killed_vllm_actor_is_replaced_and_every_id_written_once(ray_local, tmp_path):
    n = 32
    inp = write_prompts(tmp_path / "in.jsonl", n)
    out = tmp_path / "out"
    m, before = run_and_kill(
        lambda: generate(inp, out, "pool.batch_size=2", "outputs.rows_per_file=2", "sampling.max_new_tokens=24"),
        out,
        "MapBatches(SLWorker)",
    )
    assert before < n, "the kill must happen mid-run"
    assert m["counts"]["written"] == n and m["counts"]["rejected"] == 0
    assert m["timing"]["engine_actors_started"] >= 2  # the pool replaced the dead actor
    ids = [r["id"] for r in rows(out)]
    assert len(ids) == len(set(ids)) == n


def _label_cfg(tmp_path, inp, **over):
    base = [
        f"input={inp}",
        f"output={tmp_path / 'labels'}",
        "policy.backend=vllm",
        "policy.model=tiny-random-wide",
        "labeler.backend=vllm",
        "labeler.model=tiny-random-wide",
        "policy.dtype=float32",
        "labeler.dtype=float32",
        "policy.threads=1",
        "labeler.threads=1",
        "sampling.max_new_tokens=32",
        "pairs.samples=3",
        "labeler_pool.batch_size=2",
        "outputs.rows_per_file=2",
        "labeler_pool.cpus_per_actor=0.5",
        "labeler_pool.min_actors=1",
        "labeler_pool.max_actors=2",
        "policy_pool.cpus_per_actor=0.5",
        "policy_pool.batch_size=1",
    ]
    return load_config(LabelConfig, None, base + [f"{k}={v}" for k, v in over.items()])


def test_label_stage_on_vllm_pools(ray_local, tmp_path):
    """A vLLM policy pool samples pairs for prompt rows, a (1, 2) vLLM labeler pool labels
    them and the given pairs; the policy actor is killed mid-run and replaced; a lost part
    is redone."""
    from cai_ray.label.run import label

    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"q{i}", "prompt": f"Tell me about topic {i}."}) for i in range(12)]
    lines += [
        json.dumps(
            {
                "id": f"p{i}",
                "prompt": f"question {i}?",
                "response_a": f"answer {i} one",
                "response_b": f"answer {i} two",
            }
        )
        for i in range(4)
    ]
    lines += ["{not json", json.dumps({"id": "bad", "prompt": "q", "response_a": "same", "response_b": "same"})]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "labels"
    m, before = run_and_kill(
        lambda: label(_label_cfg(tmp_path, src)), out, "MapBatches(PairSampler)", after_a_part=False
    )
    c = m["counts"]
    assert (c["read"], c["written"], c["rejected"]) == (18, 16, 2)
    labelled = rows(out) + rows(out, "filtered")
    ids = [r["id"] for r in labelled]
    assert len(ids) == len(set(ids)) and {r["prompt_id"] for r in labelled} == {f"q{i}" for i in range(12)} | {
        f"p{i}" for i in range(4)
    }
    for r in labelled:
        if r["p_a"] is not None:  # both orders scored, debiased
            assert r["p_a"] == pytest.approx((r["p_ab"] + r["p_ba"]) / 2)
        assert r["labeler"] == "tiny-random-wide"
    assert m["timing"]["engine_actors_started"] >= 3  # policy + labeler + the killed policy's replacement
    assert m["models"]["labeler"]["backend"] == "vllm"

    part = sorted((out / "data").glob("part-*.parquet"))[0]
    lost = {r["prompt_id"] for r in pq.read_table(part).to_pylist()}
    part.unlink()
    again = label(_label_cfg(tmp_path, src))
    assert again["counts"]["rejected"] == 2 and again["counts"]["written"] == 16
    assert {r["prompt_id"] for r in rows(out) + rows(out, "filtered")} >= lost
