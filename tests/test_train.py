"""Training on Ray Train + DeepSpeed with tiny-random (CPU, gloo): each trainer with 2
workers at ZeRO-2 and ZeRO-3, learning is real, outputs are usable by the next stage, runs
resume after an interrupted driver and after a killed worker, bad data is a clear error."""

import json
import math
import random
from pathlib import Path

import pytest

from cai_ray.config import DPOTrainConfig, RMTrainConfig, SFTTrainConfig, load_config

MEMORISE = [
    {
        "messages": [
            {"role": "user", "content": f"What does code {i} mean?"},
            {"role": "assistant", "content": f"Code {i} means colour {'red green blue'.split()[i % 3]}."},
        ]
    }
    for i in range(8)
]
KIND = "glad happy kind gentle warm careful calm patient".split()
RUDE = "no stupid awful useless angry dumb lazy rotten".split()


def preference_toy(n: int, p_chosen: float | None = None, seed: int = 0) -> list[dict]:
    """Pairs a model can separate: the chosen answer is built from friendly words, the rejected
    one from rude words, in random orders and lengths (so a random model is at chance)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(3, 6)
        row = {
            "id": f"toy-{i}",
            "prompt": f"Question {i}: can you help me with task {rng.randint(0, 99)}?",
            "chosen": " ".join(rng.choices(KIND, k=k)) + ".",
            "rejected": " ".join(rng.choices(RUDE, k=k)) + ".",
        }
        if p_chosen is not None:
            row["p_chosen"] = p_chosen
        rows.append(row)
    return rows


def _write(path, rows, extra_lines=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra_lines)
    return path


def _cfg(cls, tmp_path, data, **over):
    base = [
        f"data={data}",
        f"output={tmp_path / 'out'}",
        "model=tiny-random",
        "scaling.workers=2",
        "scaling.cpus_per_worker=0.5",
        "optim.max_steps=12",
        "optim.learning_rate=3e-3",
        "optim.per_worker_batch_size=4",
        "checkpoint.every_steps=6",
    ]
    return load_config(cls, None, base + [f"{k}={v}" for k, v in over.items()])


def _curve(out):
    return [p["loss"] for p in json.loads((out / "metrics.json").read_text())["loss_curve"]]


def _generate(model_dir, messages):
    from cai_ray.engine import Sampling, load_engine

    engine = load_engine("hf", model=str(model_dir), dtype="float32", threads=1)
    [text] = engine.generate([messages], Sampling(temperature=0, max_new_tokens=8))
    return text


# -- SFT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero", [2, 3])
def test_sft_two_workers_learns_and_writes_a_usable_model(ray_local, tmp_path, zero):
    from cai_ray.train.sft import train_sft

    bad = [{"messages": [{"role": "user", "content": "no answer"}]}, {"prompt": "p", "completion": "  "}]
    data = _write(tmp_path / "sft.jsonl", MEMORISE + bad, "{broken\n")
    m = train_sft(_cfg(SFTTrainConfig, tmp_path, data, zero=zero))
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    curve = _curve(out)
    assert metrics["global_step"] == 12 and len(curve) == 12
    assert curve[-1] < curve[0] / 2  # a set it can memorise: the loss falls
    assert m["data"]["rows"] == 8 and m["data"]["rejected"] == 3
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [9, 10, 11] and all(r["reason"] for r in rejects)
    assert m["config"]["zero"] == zero and m["status"] == "finished"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "_work").exists()  # per-rank scratch is removed; Ray Train keeps the checkpoints
    assert isinstance(_generate(out / "model", MEMORISE[0]["messages"][:1]), str)


def test_sft_with_lora_and_helpfulness_mix(ray_local, tmp_path):
    """LoRA adapters merged into a plain model folder; helpfulness rows mixed in at the ratio."""
    from safetensors import safe_open

    from cai_ray.train.sft import train_sft

    data = _write(tmp_path / "sft.jsonl", MEMORISE)
    helpful = _write(
        tmp_path / "helpful.jsonl",
        [{"prompt": f"Give me tip {i}", "completion": f"Tip {i}: drink water."} for i in range(3)]
        + [{"prompt": "", "completion": "x"}],
    )
    m = train_sft(
        _cfg(
            SFTTrainConfig,
            tmp_path,
            data,
            mix=f"{helpful}:0.5",
            **{"lora.enabled": "true", "lora.r": 4, "lora.alpha": 8, "optim.learning_rate": 1e-2},
        )
    )
    out = tmp_path / "out"
    # 8 revisions at a 0.5 share → 8 helpful rows from a file of 3: repeated, and said so
    assert m["mix"]["rows"] == 8 and m["mix"]["available"] == 3 and m["mix"]["repeated"] and m["mix"]["share"] == 0.5
    assert m["data"]["rows"] == 16 and m["data"]["rejected_by_reason"] == {"empty prompt": 1}
    assert m["fingerprint"]["lora"]["enabled"] and m["fingerprint"]["mix"] == f"{helpful}:0.5"
    assert _curve(out)[-1] < _curve(out)[0]
    assert not (out / "model" / "adapter_config.json").exists()  # merged: a plain model
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())
    assert isinstance(_generate(out / "model", MEMORISE[0]["messages"][:1]), str)


def test_sl_output_folder_is_sft_data(tmp_path):
    """The SL-CAI stage's data/ parts feed SFT directly: prompt turns → prompt, revision → completion."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cai_ray.records import MESSAGES
    from cai_ray.train.data import load_rows, sft_row

    (tmp_path / "data").mkdir()
    msgs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "revised answer"}]]
    pq.write_table(pa.table({"id": ["a"], "messages": pa.array(msgs, MESSAGES)}), tmp_path / "data" / "part-x.parquet")
    rows, rejects = load_rows(str(tmp_path), sft_row)
    assert (
        rows
        == [
            {
                "id": "a",
                "prompt": [{"role": "user", "content": "q"}],
                "completion": [{"role": "assistant", "content": "revised answer"}],
            }
        ]
        and rejects == []
    )


# -- preference model ------------------------------------------------------------------------
@pytest.mark.parametrize("zero,p_chosen", [(2, None), (3, 0.8)])
def test_preference_model_separates_a_toy_set(ray_local, tmp_path, zero, p_chosen):
    """Hard labels (Bradley-Terry) at ZeRO-2, the paper's soft labels at ZeRO-3: at least 85%
    held-out accuracy either way (chance is 50%; runs land at 0.90-0.98, and ZeRO-3's reduction
    order over two workers is not bit-reproducible, so one pair of the 50 can flip); with soft targets of 0.8 the model's σ(r_c - r_r) comes out near 0.8,
    not near 1 as Bradley-Terry would drive it."""
    from cai_ray.train.rm import score_pairs, train_rm

    data = _write(
        tmp_path / "prefs.jsonl",
        preference_toy(200, p_chosen) + [{"prompt": "q", "chosen": "same", "rejected": "same"}],
    )
    m = train_rm(
        _cfg(
            RMTrainConfig,
            tmp_path,
            data,
            zero=zero,
            eval_fraction=0.25,
            **{"optim.max_steps": 60, "optim.per_worker_batch_size": 4, "checkpoint.every_steps": 30},
        )
    )
    out = tmp_path / "out"
    assert m["targets"] == ("hard" if p_chosen is None else "soft")
    assert m["data"]["rejected_by_reason"] == {"chosen and rejected are identical": 1}
    assert m["split"]["held_out"] >= 30 and m["split"]["train"] + m["split"]["held_out"] == 200
    ev = m["metrics"]["eval"]
    assert ev["pairs"] == m["split"]["held_out"] and ev["accuracy"] >= 0.85
    assert (out / "calibration.png").exists() and (out / "loss.png").exists()
    # the saved folder is a one-output classifier any transformers user can load
    toy = preference_toy(10, seed=7)
    held = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in toy
    ]
    q = [1 / (1 + math.exp(-d)) for d in score_pairs(str(out / "model"), held)]
    if p_chosen is None:
        assert sum(q) / len(q) > 0.85
    else:
        assert 0.6 < sum(q) / len(q) < 0.93 and ev["mean_abs_error"] < 0.2


def test_soft_loss_is_bradley_terry_at_p_1_and_pulls_towards_p():
    import torch

    from cai_ray.train.rm import soft_preference_loss

    d = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    bt = -torch.nn.functional.logsigmoid(d).mean()
    assert torch.allclose(soft_preference_loss(d, torch.ones(3)), bt)
    # the minimum over d of the soft loss is at σ(d) = p
    p = torch.tensor(0.8)
    grid = torch.linspace(-4, 4, 801)
    best = grid[torch.stack([soft_preference_loss(x.view(1), p) for x in grid]).argmin()]
    assert abs(torch.sigmoid(best).item() - 0.8) < 0.01


def test_preference_rows_mixed_targets_are_an_error(tmp_path):
    from cai_ray.train.data import TrainDataError
    from cai_ray.train.rm import train_rm

    data = _write(tmp_path / "p.jsonl", preference_toy(3, 0.9) + preference_toy(2, seed=1))
    with pytest.raises(TrainDataError, match="set targets=hard"):
        train_rm(_cfg(RMTrainConfig, tmp_path, data))


# -- DPO -------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero", [2, 3])
def test_dpo_two_workers_prefers_the_chosen_answers(ray_local, tmp_path, zero):
    from cai_ray.train.dpo import train_dpo

    data = _write(tmp_path / "prefs.jsonl", preference_toy(32))
    m = train_dpo(
        _cfg(DPOTrainConfig, tmp_path, data, zero=zero, beta=0.1, **{"optim.max_steps": 8, "optim.learning_rate": 1e-3})
    )
    out = tmp_path / "out"
    curve = _curve(out)
    assert abs(curve[0] - math.log(2)) < 0.02  # policy = reference at the start
    assert curve[-1] < 0.6 and m["metrics"]["last_log"]["rewards/margins"] > 0
    assert m["fingerprint"]["beta"] == 0.1 and m["config"]["zero"] == zero
    assert isinstance(_generate(out / "model", [{"role": "user", "content": "hi"}]), str)


# -- checkpoints, resume, failures -----------------------------------------------------------
def test_rerunning_the_same_command_continues_from_the_last_checkpoint(ray_local, tmp_path):
    """Ray Train restores a run of the same name and storage path: the second run starts
    from the first one's last checkpoint (step 4), not from step 0."""
    from cai_ray.train.sft import train_sft

    data = _write(tmp_path / "sft.jsonl", MEMORISE)
    over = {"scaling.workers": 1, "scaling.cpus_per_worker": 1.0, "checkpoint.every_steps": 2}
    first = train_sft(_cfg(SFTTrainConfig, tmp_path, data, **over, **{"optim.max_steps": 4}))
    assert first["metrics"]["global_step"] == 4 and not first["metrics"]["resumed_from"]
    second = train_sft(_cfg(SFTTrainConfig, tmp_path, data, **over, **{"optim.max_steps": 6}))
    assert second["metrics"]["resumed_from"] and second["metrics"]["global_step"] == 6
    steps = [p["step"] for p in json.loads((tmp_path / "out" / "metrics.json").read_text())["loss_curve"]]
    assert steps[-1] == 6 and len(steps) == 6  # the log history came back with the checkpoint


def test_a_killed_worker_restarts_from_the_last_checkpoint(ray_local, tmp_path):
    """SIGKILL the Ray Train worker once its first checkpoint is registered: with
    checkpoint.max_failures=1 the worker group restarts and finishes from that checkpoint."""
    import os
    import signal
    import threading
    import time

    from cai_ray.train.sft import train_sft

    data = _write(tmp_path / "sft.jsonl", MEMORISE * 4)
    storage = tmp_path / "out" / "ray" / "sft"
    killed = []

    def train_workers():  # Ray titles its worker processes ray::<actor class>.<method>
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    yield int(proc.name)
            except OSError:
                pass

    def registered_checkpoints():
        try:
            return json.loads((storage / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            return []

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if registered_checkpoints():
                for pid in train_workers():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    t = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    t.start()
    m = train_sft(
        _cfg(
            SFTTrainConfig,
            tmp_path,
            data,
            **{
                "scaling.workers": 1,
                "scaling.cpus_per_worker": 1.0,
                "checkpoint.every_steps": 3,
                "checkpoint.max_failures": 1,
                "optim.max_steps": 40,
                "optim.per_worker_batch_size": 2,
            },
        )
    )
    t.join()
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    assert m["metrics"]["resumed_from"] and m["metrics"]["global_step"] == 40
    steps = [p["step"] for p in json.loads((tmp_path / "out" / "metrics.json").read_text())["loss_curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    from cai_ray.train.harness import fingerprint_of, refuse_mixed_run

    cfg = {
        "model": "m",
        "seed": 0,
        "zero": 2,
        "scaling": {"workers": 2},
        "lora": {"enabled": False},
        "optim": {
            "learning_rate": 1e-5,
            "per_worker_batch_size": 4,
            "grad_accum": 1,
            "max_length": 512,
            "dtype": "auto",
            "max_steps": 10,
            "epochs": 1,
        },
    }
    (tmp_path / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint_of("sft", cfg, "abc", {})}))
    longer = {**cfg, "optim": {**cfg["optim"], "max_steps": 20}}
    refuse_mixed_run(tmp_path, fingerprint_of("sft", longer, "abc", {}))  # extending a run is fine
    with pytest.raises(ValueError, match=r"different settings \(zero\)"):
        refuse_mixed_run(tmp_path, fingerprint_of("sft", {**cfg, "zero": 3}, "abc", {}))
    with pytest.raises(ValueError, match=r"different settings \(data_sha256\)"):
        refuse_mixed_run(tmp_path, fingerprint_of("sft", cfg, "other", {}))


# -- data ------------------------------------------------------------------------------------
def test_sft_data_errors_are_clear(tmp_path):
    from cai_ray.train.data import TrainDataError, load_rows, sft_row

    empty = _write(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(TrainDataError, match="no usable rows"):
        load_rows(str(empty), sft_row)
    with pytest.raises(TrainDataError, match="not found"):
        load_rows(str(tmp_path / "missing.txt"), sft_row)


def test_preference_rows_from_labels_and_files_and_their_rejects():
    from cai_ray.train.data import pref_row

    conv = [{"role": "user", "content": "q"}]
    label_out = {
        "id": "x",
        "prompt": "q",
        "prompt_messages": conv,
        "p_chosen": 0.7,
        "chosen": conv + [{"role": "assistant", "content": "good"}],
        "rejected": conv + [{"role": "assistant", "content": "bad"}],
    }
    row, why = pref_row(label_out)
    assert why is None and row == {
        "prompt": conv,
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "p_chosen": 0.7,
    }
    assert pref_row({"prompt": "q", "chosen": "a", "rejected": "b"})[0]["p_chosen"] is None
    bad = {
        "needs 'chosen'": {"prompt": "q", "chosen": None, "rejected": None},
        "identical": {"prompt": "q", "chosen": "a", "rejected": "a"},
        "non-empty 'prompt'": {"prompt": " ", "chosen": "a", "rejected": "b"},
        "p_chosen must be": {"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 0.3},
        "different conversations": {
            **label_out,
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "bad"}],
        },
        "assistant turns": {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        "one assistant message": {
            "prompt": "q",
            "chosen": [{"role": "assistant", "content": "a"}] * 2,
            "rejected": "b",
        },
    }
    for reason, rec in bad.items():
        row, why = pref_row(rec)
        assert row is None and reason in why, (reason, why)


def test_over_long_rows_are_rejects_not_truncated(tiny_model):
    from transformers import AutoTokenizer

    from cai_ray.train.data import reject_long

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [
        {
            "id": "short",
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        },
        {
            "id": "long",
            "prompt": [{"role": "user", "content": "word " * 200}],
            "completion": [{"role": "assistant", "content": "yo"}],
        },
    ]
    keep, rejects = reject_long(rows, tok, 64, ("completion",))
    assert [r["id"] for r in keep] == ["short"]
    assert rejects[0]["id"] == "long" and "longer than optim.max_length" in rejects[0]["reason"]


def test_mix_and_split_are_seeded_and_exact():
    from cai_ray.train.data import mix_in, split

    rows = [{"id": f"r{i}"} for i in range(30)]
    helpful = [{"id": f"h{i}"} for i in range(50)]
    mixed, info = mix_in(rows, helpful, 0.25, seed=1)
    assert info == {"rows": 10, "available": 50, "repeated": False, "share": 0.25}
    assert len(mixed) == 40 and len({r["id"] for r in mixed if r["id"].startswith("h")}) == 10
    assert mixed == mix_in(rows, helpful, 0.25, seed=1)[0]
    many = [{"id": f"r{i}"} for i in range(2000)]
    train, held = split(many, 0.3, seed=0)
    assert len(train) + len(held) == 2000 and abs(len(held) / 2000 - 0.3) < 0.04
    # a row's side does not depend on the other rows, only on its id and the seed
    assert split(many[:100], 0.3, seed=0)[1] == [r for r in held if int(r["id"][1:]) < 100]
    assert split(many, 0.3, seed=1)[1] != held
