"""Two Ray nodes on one machine (tests/support/nodes.py): a token-authenticated head and a
worker node with its own CPUs, temp dir, TMPDIR ("its own disk") and model cache. The batch
stages place one engine actor per node, the worker node is lost mid-run (SIGKILL of its
raylet and every process it started), and the job still finishes with every input id written
exactly once; training with an object-store output places one rank per node and leaves no
per-rank scratch on the worker node's disk. Each test reports how long it ran (-ra -s)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.nodes import TwoNodes

from cai_ray.batch.stage import read_output

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_nodes(s3):
    """Head + worker node, both with the S3 server's credentials in their environment (as
    cloud nodes have theirs); the worker node's model cache built once, by the node itself."""
    env, _ = s3
    nodes = TwoNodes(env=env)
    try:
        nodes.up()
        seen = nodes.on_worker_node("tiny-random")
        # Ray workers inherit the raylet's environment: that node's temp files and models are its own
        assert seen["tmp"] == str(nodes.worker_tmp)
        assert Path(seen["model"]).is_relative_to(nodes.worker_cache) and Path(seen["model"], "config.json").exists()
        yield nodes
    finally:
        nodes.down()


@pytest.fixture
def cluster(two_nodes):
    """Both nodes up (a test before may have lost the worker node: it joins again)."""
    if not two_nodes.processes(two_nodes.worker_temp):
        two_nodes.start_worker()
    t0 = time.perf_counter()
    yield two_nodes
    print(f"\n[two nodes] test ran {time.perf_counter() - t0:.0f} s")


def rows_out(out: Path) -> int:
    try:
        table = read_output(out, ["id"], ("data", "filtered"))
    except (OSError, ValueError):  # a part being renamed into place
        return 0
    return 0 if table is None else table.num_rows


def check_exactly_once(out: Path, id_column: str, good_ids: list[str], bad: int) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert manifest["status"] == "finished"
    assert c["read"] == len(good_ids) + bad and c["written"] == len(good_ids) and c["rejected"] == bad, c
    ids = read_output(out, [id_column], ("data", "filtered")).column(0).to_pylist()
    assert sorted(ids) == sorted(good_ids)  # each once: no loss, no duplicate from a retried block
    assert len((out / "rejects.jsonl").read_text().splitlines()) == bad
    return manifest


def write_input(path: Path, n: int, pairs: bool) -> list[str]:
    rows = []
    for i in range(n):
        row = {"id": f"r{i:03d}", "prompt": f"Question {i}: how do I keep my accounts safe online?"}
        if pairs:
            row.update(response_a=f"Use a password manager ({i}).", response_b=f"Reuse one password ({i}).")
        rows.append(json.dumps(row))
    path.write_text("\n".join([*rows, "{not json", '{"prompt": ""}']) + "\n")
    return [f"r{i:03d}" for i in range(n)]


def assert_node_loss_handled(actors: dict, name: str, log: Path) -> None:
    assert actors["rc"] == 0, log.read_text()[-5000:]
    seen = actors["seen"]
    print(
        f"\n[two nodes] {name} actors: "
        + ", ".join(f"{a['id'][:6]} {a['state']} on {a['node']}" for a in seen if name in a["class"])
    )
    # the pool had an actor up on the worker node when the node was lost, and Ray restarted it
    # (on the head, the one node left: whether it is up again before the last batch is timing)
    on_worker = {a["id"] for a in seen if name in a["class"] and a["node"] == "worker" and a["state"] == "ALIVE"}
    assert on_worker, seen
    assert any(a["id"] in on_worker and a["state"] == "RESTARTING" for a in seen), seen
    # the row ledger stays on the driver's node: lost with the worker node, it would take the accounting with it
    ledgers = [a for a in seen if a["class"] == "Ledger"]
    assert ledgers and all(a["node"] == "head" for a in ledgers), ledgers


@pytest.mark.slow
def test_generate_finishes_when_the_worker_node_is_lost(cluster, tmp_path):
    good = write_input(tmp_path / "prompts.jsonl", 64, pairs=False)
    out = tmp_path / "sl"
    cmd = [
        *(sys.executable, "-m", "cai_ray.cli", "generate"),
        *("--input", str(tmp_path / "prompts.jsonl"), "--output", str(out)),
        *("--model", "tiny-random", "--revisions", "1", "--max-new-tokens", "8", "--actors", "2,2"),
        f"ray_address={cluster.address}",
        "engine.dtype=float32",
        "pool.cpus_per_actor=0.5",
        "pool.batch_size=4",
        "outputs.rows_per_file=4",
    ]
    actors = cluster.lose_worker_mid_run(
        cmd, "SLWorker", lambda: rows_out(out), len(good), tmp_path / "generate.log", ROOT
    )
    assert_node_loss_handled(actors, "SLWorker", tmp_path / "generate.log")
    check_exactly_once(out, "id", good, bad=2)


@pytest.mark.slow
def test_label_finishes_when_the_worker_node_is_lost(cluster, tmp_path):
    good = write_input(tmp_path / "pairs.jsonl", 128, pairs=True)  # labels are quick: a longer run
    out = tmp_path / "labels"
    cmd = [
        *(sys.executable, "-m", "cai_ray.cli", "label"),
        *("--input", str(tmp_path / "pairs.jsonl"), "--output", str(out), "--labeler", "tiny-random"),
        f"ray_address={cluster.address}",
        "labeler.dtype=float32",
        "labeler_pool.min_actors=2",
        "labeler_pool.max_actors=2",
        "labeler_pool.cpus_per_actor=0.5",
        "labeler_pool.batch_size=4",
        "outputs.rows_per_file=4",
    ]
    actors = cluster.lose_worker_mid_run(
        cmd, "LabelWorker", lambda: rows_out(out), len(good), tmp_path / "label.log", ROOT
    )
    assert_node_loss_handled(actors, "LabelWorker", tmp_path / "label.log")
    check_exactly_once(out, "prompt_id", good, bad=2)


@pytest.mark.slow
def test_sft_to_s3_leaves_no_rank_scratch_on_the_worker_node(cluster, s3, tmp_path):
    """Two ranks, one per node (STRICT_SPREAD), output on S3: each rank stages in
    $TMPDIR/cai-ray-staging/<hash> of its own node. The driver (on the head) can only clean its
    own node; the worker node's ``_work/rankN`` (HF checkpoints) must go with its rank."""
    _, client = s3
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Question {i}?", "completion": f"A careful answer {i}."} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [
        *(sys.executable, "-m", "cai_ray.cli", "train", "sft"),
        *("--data", str(data), "--output", "s3://outputs/sft-two-nodes", "--model", "tiny-random"),
        *("--workers", "2", "--max-steps", "2"),
        f"ray_address={cluster.address}",
        "zero=0",
        "scaling.cpus_per_worker=0.5",
        "scaling.placement_strategy=STRICT_SPREAD",
        "optim.per_worker_batch_size=2",
        "checkpoint.every_steps=1",
    ]
    proc = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    got = client.list_objects_v2(Bucket="outputs", Prefix="sft-two-nodes/")["Contents"]
    assert any(o["Key"] == "sft-two-nodes/model/config.json" for o in got)
    staging = cluster.worker_tmp / "cai-ray-staging"
    held = sorted(str(p.relative_to(staging)) for p in staging.glob("*/*")) if staging.is_dir() else []
    print(f"\n[two nodes] the worker node's staging folder holds: {held}")
    # a rank worked on the worker node's disk ...
    assert staging.is_dir() and any(staging.iterdir()), "no rank staged on the worker node"
    # ... and took its scratch with it
    left = sorted(str(p.relative_to(staging)) for p in staging.glob("*/_work/*"))
    assert not left, f"per-rank scratch left on the worker node: {left}"
    # and whichever rank published left no model copy behind either
    assert not held, f"the worker node's staging folder still holds {held}"
