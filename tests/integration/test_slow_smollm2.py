"""End to end with the embedded SmolLM2-135M (slow: real model on CPU)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cai_ray.config import load_config
from cai_ray.generate.config import GenerateConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smollm2_sl_cai_on_a_few_prompts(ray_local, tmp_path):
    from cai_ray.generate.run import generate

    src = (ROOT / "jobs" / "data" / "red_team.jsonl").read_text().splitlines()[:3]
    inp = tmp_path / "p.jsonl"
    inp.write_text("\n".join(src) + "\n")
    cfg = load_config(
        GenerateConfig,
        None,
        [
            f"input={inp}",
            f"output={tmp_path / 'o'}",
            "engine.model=smollm2",
            "revisions=1",
            "sampling.max_new_tokens=48",
            "sampling.temperature=0",
            "pool.batch_size=3",
        ],
    )
    m = generate(cfg)
    assert m["counts"] == {**m["counts"], "read": 3, "written": 3, "rejected": 0}
    rows = pq.read_table(tmp_path / "o" / "data").to_pylist()
    for r in rows:
        # a real instruct model writes text at every step (135M: not necessarily good text)
        for text in (r["init_response"], r["steps"][0]["critique"], r["revision"]):
            assert len(text.strip()) >= 20 and any(c.isalpha() for c in text)
    assert json.loads(r["meta"])["category"]
    assert m["model"]["name"] == "smollm2"


@pytest.mark.slow
def test_smollm2_labels_sampled_pairs_and_the_gold_set(ray_local, tmp_path):
    """The whole RLAIF stage with the real model: SmolLM2 samples answers, SmolLM2 labels
    them (both orders), and labels the bundled gold pairs for accuracy and calibration."""
    from cai_ray.label.config import LabelConfig
    from cai_ray.label.run import label

    src = (ROOT / "jobs" / "data" / "red_team.jsonl").read_text().splitlines()[:3]
    inp = tmp_path / "p.jsonl"
    inp.write_text("\n".join(src) + "\n")
    cfg = load_config(
        LabelConfig,
        None,
        [
            f"input={inp}",
            f"output={tmp_path / 'o'}",
            "policy.model=smollm2",
            "labeler.model=smollm2",
            "pairs.samples=2",
            "sampling.max_new_tokens=32",
            "labeler_pool.batch_size=8",
            "policy_pool.cpus_per_actor=0.5",
            f"gold={ROOT / 'jobs' / 'data' / 'gold_pairs.jsonl'}",
        ],
    )
    m = label(cfg)
    assert m["counts"]["read"] == 3 and m["counts"]["written"] + m["counts"]["rejected"] == 3
    rows = pq.read_table(tmp_path / "o" / "data").to_pylist()
    assert rows and all(r["policy"] == "smollm2" and r["labeler"] == "smollm2" for r in rows)
    for r in rows:
        assert 0 < r["p_ab"] < 1 and 0 < r["p_ba"] < 1
        assert r["p_a"] == pytest.approx((r["p_ab"] + r["p_ba"]) / 2)
    g = m["gold"]
    assert g["gold_pairs"] == g["labelled"] == 20 and g["accuracy"] is not None and g["ece"] is not None
    assert Path(g["reliability_png"]).exists()
    q = m["labels"]
    assert q["labels"] == len(rows) and q["position_bias"] is not None


@pytest.mark.slow
def test_smollm2_sft_on_two_workers(ray_local, tmp_path):
    """SmolLM2-135M fine-tuned by 2 Ray Train workers under ZeRO-2: the loss falls over three
    passes of a small set, and the saved folder generates with our engine."""
    from cai_ray.engine import Sampling, load_engine
    from cai_ray.train.config import SFTTrainConfig
    from cai_ray.train.sft import train_sft

    data = tmp_path / "helpful.jsonl"
    data.write_text("\n".join((ROOT / "jobs" / "data" / "helpful.jsonl").read_text().splitlines()[:8]) + "\n")
    m = train_sft(
        load_config(
            SFTTrainConfig,
            None,
            [
                f"data={data}",
                f"output={tmp_path / 'sft'}",
                "model=smollm2",
                "zero=2",
                "scaling.workers=2",
                "scaling.cpus_per_worker=1",
                "optim.max_steps=6",
                "optim.per_worker_batch_size=2",
                "optim.learning_rate=1e-4",
                "optim.max_length=256",
                "checkpoint.every_steps=6",
            ],
        )
    )
    curve = [p["loss"] for p in json.loads((tmp_path / "sft" / "metrics.json").read_text())["loss_curve"]]
    # 8 rows, 4 a step: each epoch is 2 steps; by the third pass the same rows cost less
    assert len(curve) == 6 and sum(curve[-2:]) < 0.9 * sum(curve[:2])
    assert m["base_model"]["name"] == "smollm2" and m["data"]["rows"] == 8
    engine = load_engine("hf", model=str(tmp_path / "sft" / "model"), dtype="float32", threads=2)
    [text] = engine.generate(
        [[{"role": "user", "content": "What is the capital of Australia?"}]], Sampling(temperature=0, max_new_tokens=16)
    )
    assert any(c.isalpha() for c in text)
