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


def test_rerunning_the_same_command_continues_from_the_last_checkpoint(ray_local, tmp_path):
    """Ray Train restores a run of the same name and storage path: the second run starts
    from the first one's last checkpoint (step 4), not from step 0."""
    from cai_ray.train.sft import train_sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MEMORISE))
    over = {"scaling.workers": 1, "scaling.cpus_per_worker": 1.0, "checkpoint.every_steps": 2}
    first = train_sft(_cfg(tmp_path, data, **over, **{"optim.max_steps": 4}))
    assert first["metrics"]["global_step"] == 4 and not first["metrics"]["resumed_from"]
    second = train_sft(_cfg(tmp_path, data, **over, **{"optim.max_steps": 6}))
    assert second["metrics"]["resumed_from"] and second["metrics"]["global_step"] == 6
    steps = [p["step"] for p in json.loads((tmp_path / "out" / "metrics.json").read_text())["loss_curve"]]
    assert steps[-1] == 6 and len(steps) == 6  # the log history came back with the checkpoint


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    from cai_ray.train.sft import refuse_mixed_run, sft_fingerprint

    cfg = {"model": "m", "seed": 0, "zero": 2, "scaling": {"workers": 2},
           "optim": {"learning_rate": 1e-5, "per_worker_batch_size": 4, "grad_accum": 1, "max_length": 512,
                     "dtype": "auto", "max_steps": 10, "epochs": 1}}
    rows = [{"prompt": [], "completion": []}]
    (tmp_path / "manifest.json").write_text(json.dumps({"fingerprint": sft_fingerprint(cfg, rows)}))
    longer = {**cfg, "optim": {**cfg["optim"], "max_steps": 20}}
    refuse_mixed_run(tmp_path, sft_fingerprint(longer, rows))  # extending a run is fine
    other = {**cfg, "zero": 3}
    with pytest.raises(ValueError, match=r"different settings \(zero\)"):
        refuse_mixed_run(tmp_path, sft_fingerprint(other, rows))
