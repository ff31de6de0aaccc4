"""SFT on Ray Train + DeepSpeed with tiny-random (CPU, gloo): learning is real, the output
is a model folder the engines load, bad data is a clear error."""

import json

import pytest

from cai_ray.config import SFTTrainConfig, load_config

MEMORISE = [{"messages": [{"role": "user", "content": f"What does code {i} mean?"},
                          {"role": "assistant", "content": f"Code {i} means colour {'red green blue'.split()[i % 3]}."}]}
            for i in range(8)]


def _cfg(tmp_path, data, **over):
    base = [f"data={data}", f"output={tmp_path / 'out'}", "model=tiny-random", "scaling.workers=2",
            "scaling.cpus_per_worker=0.5", "optim.max_steps=12", "optim.learning_rate=3e-3",
            "optim.per_worker_batch_size=4", "checkpoint.every_steps=6"]
    return load_config(SFTTrainConfig, None, base + [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("zero", [2, 3])
def test_sft_two_workers_learns_and_writes_a_usable_model(ray_local, tmp_path, zero):
    from cai_ray.engine import Sampling, load_engine
    from cai_ray.train.sft import train_sft

    data = tmp_path / "sft.jsonl"
    bad = [{"messages": [{"role": "user", "content": "no answer"}]}, {"prompt": "p", "completion": "  "}]
    data.write_text("".join(json.dumps(r) + "\n" for r in MEMORISE + bad) + "{broken\n")
    m = train_sft(_cfg(tmp_path, data, zero=zero))
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    curve = [p["loss"] for p in metrics["loss_curve"]]
    assert metrics["global_step"] == 12 and len(curve) == 12
    assert curve[-1] < curve[0] / 2  # a set it can memorise: the loss falls
    assert m["data"]["rows"] == 8 and sum(m["data"]["rejected_by_reason"].values()) == 3
    assert m["config"]["zero"] == zero and m["status"] == "finished"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    engine = load_engine("hf", model=str(out / "model"), dtype="float32", threads=1)
    [text] = engine.generate([MEMORISE[0]["messages"][:1]], Sampling(temperature=0, max_new_tokens=8))
    assert isinstance(text, str)


def test_sft_data_errors_are_clear(tmp_path):
    from cai_ray.train.sft import TrainDataError, sft_rows

    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(TrainDataError, match="no usable rows"):
        sft_rows(str(empty))
    with pytest.raises(TrainDataError, match="not found"):
        sft_rows(str(tmp_path / "missing.txt"))


def test_sl_output_folder_is_sft_data(tmp_path):
    """The SL-CAI stage's data/ parts feed SFT directly: prompt turns → prompt, revision → completion."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cai_ray.records import MESSAGES
    from cai_ray.train.sft import sft_rows

    (tmp_path / "data").mkdir()
    msgs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "revised answer"}]]
    pq.write_table(pa.table({"id": ["a"], "messages": pa.array(msgs, MESSAGES)}), tmp_path / "data" / "part-x.parquet")
    rows, rejected = sft_rows(str(tmp_path))
    assert rows == [{"prompt": [{"role": "user", "content": "q"}],
                     "completion": [{"role": "assistant", "content": "revised answer"}]}] and rejected == {}
