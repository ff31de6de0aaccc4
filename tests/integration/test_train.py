"""Training on Ray Train + DeepSpeed with tiny-random (CPU, gloo): each trainer with 2
workers at ZeRO-2 and ZeRO-3, learning is real, outputs are usable by the next stage, runs
resume after an interrupted driver and after a killed worker, bad data is a clear error."""

import json
import math
from pathlib import Path

import pytest
from support.train import _cfg, _write, preference_toy

from cai_ray.train.config import DPOTrainConfig, RMTrainConfig, SFTTrainConfig

MEMORISE = [
    {
        "messages": [
            {"role": "user", "content": f"What does code {i} mean?"},
            {"role": "assistant", "content": f"Code {i} means colour {'red green blue'.split()[i % 3]}."},
        ]
    }
    for i in range(8)
]


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


# -- preference model ------------------------------------------------------------------------
@pytest.mark.parametrize("zero,p_chosen", [(2, None), (3, 0.8)])
def test_preference_model_separates_a_toy_set(ray_local, tmp_path, zero, p_chosen):
    """Hard labels (Bradley-Terry) at ZeRO-2, the paper's soft labels at ZeRO-3: at least 80%
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
    # 0.8: one run at ZeRO-3 with soft targets landed at 0.833 (ten held-out pairs of 60 wrong)
    assert ev["pairs"] == m["split"]["held_out"] and ev["accuracy"] >= 0.8
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


# -- DPO -------------------------------------------------------------------------------------
# ZeRO-3 only: ZeRO-2 runs the same harness in the SFT and preference-model tests (cut to make
# room for the two-node and ZeRO-3 rank tests of issue 26)
@pytest.mark.parametrize("zero", [3])
def test_dpo_two_workers_prefers_the_chosen_answers(ray_local, tmp_path, zero):
    from cai_ray.core.review import LabelLog
    from cai_ray.train.dpo import train_dpo

    toy = preference_toy(32)
    data = _write(tmp_path / "prefs.jsonl", toy)
    # people reviewed two pairs (HRLAIF): toy-0, which they flip, and one the AI's filter had
    # dropped; their labels take precedence and the manifest counts them
    reviewed = tmp_path / "labels"
    (reviewed / "review").mkdir(parents=True)
    queue = [
        {"pair_id": "toy-0", "prompt": [{"role": "user", "content": toy[0]["prompt"]}]}
        | {"response_a": toy[0]["chosen"], "response_b": toy[0]["rejected"], "p_a": 0.55},
        {"pair_id": "dropped-1", "prompt": [{"role": "user", "content": "Can you help me?"}]}
        | {"response_a": "Gladly, here is how.", "response_b": "No.", "p_a": 0.5},
    ]
    (reviewed / "review" / "queue.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queue))
    LabelLog(reviewed).append("label", "toy-0", "ann", "b")
    LabelLog(reviewed).append("label", "dropped-1", "ann", "a")
    over = {"optim.max_steps": 8, "optim.learning_rate": 1e-3, "human_labels": reviewed}
    m = train_dpo(_cfg(DPOTrainConfig, tmp_path, data, zero=zero, beta=0.1, **over))
    h = m["human_labels"]
    assert (h["pairs"], h["overrode_ai"], h["added"], h["flipped"]) == (2, 1, 1, 1)
    assert m["data"]["rows"] == 33
    out = tmp_path / "out"
    curve = _curve(out)
    assert abs(curve[0] - math.log(2)) < 0.02  # policy = reference at the start
    assert curve[-1] < 0.6 and m["metrics"]["last_log"]["rewards/margins"] > 0
    assert m["fingerprint"]["beta"] == 0.1 and m["config"]["zero"] == zero
    assert isinstance(_generate(out / "model", [{"role": "user", "content": "hi"}]), str)


# -- checkpoints, resume, failures -----------------------------------------------------------
def test_rerunning_the_same_command_continues_from_the_last_checkpoint(ray_local, tmp_path):
    """Ray Train restores a run of the same name and storage path: a re-run starts from the
    first one's last checkpoint (step 4), not from step 0. The storage is shared, as every GPU
    config has it: a run with another output and other data in between trains from its base
    model, and does not resume (or, the first being finished, hand back) the first run's model."""
    from cai_ray.train.sft import train_sft

    shared = tmp_path / "ray-train"
    over = {"scaling.workers": 1, "scaling.cpus_per_worker": 1.0, "checkpoint.every_steps": 2}
    over["checkpoint.storage"] = shared
    data = _write(tmp_path / "sft.jsonl", MEMORISE[:4])
    first = train_sft(_cfg(SFTTrainConfig, tmp_path, data, **over, **{"optim.max_steps": 4}))
    assert first["metrics"]["global_step"] == 4 and not first["metrics"]["resumed_from"]
    other_data = _write(tmp_path / "other.jsonl", MEMORISE[4:])
    other = train_sft(
        _cfg(SFTTrainConfig, tmp_path, other_data, output=tmp_path / "other", **over, **{"optim.max_steps": 4})
    )
    assert other["metrics"]["global_step"] == 4 and not other["metrics"]["resumed_from"]
    assert first["checkpoints"].startswith(str(shared)) and other["checkpoints"] != first["checkpoints"]
    weights = [(tmp_path / n / "model" / "model.safetensors").read_bytes() for n in ("out", "other")]
    assert weights[0] != weights[1]
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
