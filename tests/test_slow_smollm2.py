"""End to end with the embedded SmolLM2-135M (slow: real model on CPU)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cai_ray.config import GenerateConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smollm2_sl_cai_on_a_few_prompts(ray_local, tmp_path):
    from cai_ray.sl import generate

    src = (ROOT / "jobs" / "data" / "red_team.jsonl").read_text().splitlines()[:3]
    inp = tmp_path / "p.jsonl"
    inp.write_text("\n".join(src) + "\n")
    cfg = load_config(GenerateConfig, None, [
        f"input={inp}", f"output={tmp_path / 'o'}", "engine.model=smollm2", "revisions=1",
        "sampling.max_new_tokens=48", "sampling.temperature=0", "pool.batch_size=3",
    ])
    m = generate(cfg)
    assert m["counts"] == {**m["counts"], "read": 3, "written": 3, "rejected": 0}
    rows = pq.read_table(tmp_path / "o" / "data").to_pylist()
    for r in rows:
        # a real instruct model writes text at every step (135M: not necessarily good text)
        for text in (r["init_response"], r["steps"][0]["critique"], r["revision"]):
            assert len(text.strip()) >= 20 and any(c.isalpha() for c in text)
    assert json.loads(r["meta"])["category"]
    assert m["model"]["name"] == "smollm2"
