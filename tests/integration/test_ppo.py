"""RL-CAI trainers (PPO, and GRPO/RLOO in our loop or through TRL) on Ray Train + DeepSpeed with tiny-random:
learning is real, ZeRO-2 and -3 with two workers, resume, every reward source, metrics and
monitors on disk, and bad settings or reward functions are clear errors."""

import json
from pathlib import Path

import pytest
from support.ppo import BASE, REWARDS, _cfg

# tiny-random's favourite first answer token to this prompt decodes to "ugs" (~9% likely)
PROMPT = "What's the most painless way to end my life?"


def _prompts(path: Path, n: int = 8, extra: str = "") -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": PROMPT}) + "\n" for i in range(n)) + extra)
    return path


def _history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


# -- learning ----------------------------------------------------------------------------------
LEARNING = {
    "ppo.steps": 30,
    "ppo.rollout_batch": 16,
    "optim.per_worker_batch_size": 8,
    "optim.learning_rate": 3e-5,
    "ppo.value_learning_rate": 1e-4,
    "ppo.kl_coef": 0.05,
}


@pytest.mark.slow
def test_ppo_learns_to_prefer_a_token_with_bounded_kl(ray_local, tmp_path):
    """The reward prefers one token; over 30 PPO steps its mean rises clearly while the KL to
    the reference (per response) stays bounded by the penalty."""
    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl")
    m = train_rl(_cfg(tmp_path, data, **LEARNING, **{"checkpoint.every_steps": 30, "monitor.every": 15}))
    h = _history(tmp_path / "out")
    assert len(h) == 30 and m["metrics"]["global_step"] == 30
    first = sum(x["reward"] for x in h[:10]) / 10
    last = sum(x["reward"] for x in h[-10:]) / 10
    assert last >= first + 0.2, (first, last)
    assert max(x["kl"] for x in h) < 5.0  # nats per response of 4 tokens
    assert h[-1]["entropy"] < h[0]["entropy"]  # the policy concentrated
    assert h[-1]["probe_refusal_rate"] is not None and h[-1]["top_ngram_share"] is not None


# -- the trainer end to end ----------------------------------------------------------------------
def test_ppo_two_workers_zero3_lora_preference_model_resume_and_outputs(ray_local, tmp_path, token_rm):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl", extra='{"broken\n' + json.dumps({"id": "e", "prompt": " "}) + "\n")
    over = {
        "scaling.workers": 2,
        "scaling.cpus_per_worker": 0.5,
        "zero": 3,
        "reward.function": None,
        "reward.model": token_rm,
        "ppo.adaptive_kl": 0.5,
        "reward.length_penalty": 0.01,
        "monitor.every": 5,
        "lora.enabled": "true",  # adapters partitioned with the rest; OUTPUT/model merged from the gathered state
        "lora.r": 4,
    }
    m = train_rl(_cfg(tmp_path, data, **over))
    out = tmp_path / "out"
    assert m["metrics"]["global_step"] == 3 and m["data"]["rows"] == 8 and m["data"]["rejected"] == 2
    assert m["reward"]["source"] == "model"
    reasons = [json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert any("invalid JSON" in r for r in reasons) and "empty prompt" in reasons
    h = _history(out)
    for key in (
        "reward",
        "kl",
        "kl_coef",
        "entropy",
        "clipfrac",
        "value_loss",
        "response_length",
        "top_ngram_share",
        "seconds",
    ):
        assert all(key in x for x in h), key
    assert {"rollout", "score", "reference", "values", "advantages", "update"} <= set(h[0]["seconds"])
    # the probes run at the first step, every monitor.every steps and at the last
    assert h[0]["probe_refusal_rate"] is not None and "probe_refusal_rate" not in h[1] and "probe_refusal_rate" in h[2]
    assert h[-1]["kl_coef"] != h[0]["kl_coef"]  # adaptive
    assert (out / "ppo.png").stat().st_size > 10_000 and len((out / "steps.jsonl").read_text().splitlines()) == 3
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * 2  # rank 0 samples 2 prompts a step
    policy = AutoModelForCausalLM.from_pretrained(out / "model")  # plain HF folders, gathered from ZeRO-3 shards
    assert not any("lora" in n for n, _ in policy.named_parameters())  # the adapters merged in
    AutoModelForSequenceClassification.from_pretrained(out / "value")

    # the same command with more steps continues from the step-3 checkpoint
    m2 = train_rl(_cfg(tmp_path, data, **over, **{"ppo.steps": 5}))
    assert m2["metrics"]["resumed_from"] == 3 and m2["metrics"]["global_step"] == 5
    assert [x["step"] for x in _history(out)] == [1, 2, 3, 4, 5]


def test_a_killed_ppo_worker_restarts_from_the_last_checkpoint(ray_local, tmp_path):
    """SIGKILL the worker once the step-2 checkpoint is registered: with max_failures=1 the
    worker group restarts, restores both DeepSpeed engines and the loop state, and finishes."""
    import os
    import signal
    import threading
    import time

    from cai_ray.train.ppo.loop import train_rl

    storage = tmp_path / "out" / "ray" / "ppo"
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            try:
                registered = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())[
                    "checkpoint_results"
                ]
            except (OSError, ValueError, KeyError):
                registered = []
            if registered:
                for proc in Path("/proc").iterdir():
                    try:
                        if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                            os.kill(int(proc.name), signal.SIGKILL)
                            killed.append(proc.name)
                    except OSError:
                        pass
            time.sleep(0.2)

    t = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    t.start()
    m = train_rl(
        _cfg(
            tmp_path,
            _prompts(tmp_path / "p.jsonl"),
            **{"ppo.steps": 12, "checkpoint.max_failures": 1, "monitor.every": 50},
        )
    )
    t.join()
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    assert m["metrics"]["resumed_from"] and m["metrics"]["global_step"] == 12
    steps = [x["step"] for x in _history(tmp_path / "out")]
    assert steps == list(range(1, 13))  # the history came back with the checkpoint, no step twice


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_algorithms_run_through_trl_with_our_reward(ray_local, tmp_path, algo):
    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl")
    m = train_rl(
        _cfg(
            tmp_path,
            data,
            algo=algo,
            **{"ppo.steps": 2, "ppo.group_size": 2, "ppo.rollout_batch": 2, "optim.per_worker_batch_size": 4},
        )
    )
    assert m["metrics"]["global_step"] == 2
    logged = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert any("rewards/reward_function/mean" in h for h in logged), logged  # TRL logged our reward's scores
    assert (tmp_path / "out" / "model" / "config.json").exists()


def test_d_rlaif_rewards_come_from_the_labeler(ray_local, tmp_path):
    """Online AI feedback: the labeler compares each sampled answer with the reference
    policy's greedy answer; scores are probabilities."""
    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl", n=4)
    m = train_rl(
        _cfg(
            tmp_path,
            data,
            **{
                "reward.function": None,
                "reward.labeler.model": "tiny-random",
                "reward.labeler.dtype": "float32",
                "reward.labeler.threads": 1,
                "ppo.steps": 2,
                "monitor.every": 5,
            },
        )
    )
    assert m["reward"]["source"] == "labeler" and m["reward"]["constitution_sha256"]
    for x in _history(tmp_path / "out"):
        assert 0.0 <= x["reward"] <= 1.0 and x["labeler_invalid"] == 0


@pytest.mark.slow
def test_vllm_rollouts_follow_the_policy_after_every_sync_at_zero3(ray_local, tmp_path):
    """Two workers at ZeRO-3, each with a colocated vLLM (its CPU build) for rollouts: after
    every update the gathered weights reach vLLM, whose greedy answers then equal the
    training model's own and differ from vLLM's answers before the sync (a high learning
    rate makes every update visible)."""
    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl")
    over = {
        "model": "tiny-random-wide",
        "scaling.workers": 2,
        "scaling.cpus_per_worker": 0.5,
        "zero": 3,
        "rollout.engine": "vllm",
        "rollout.check_sync": "true",
        "ppo.steps": 2,
        "optim.learning_rate": 0.05,
        "rollout.max_new_tokens": 6,
        "optim.per_worker_batch_size": 2,
        "reward.function": f"{REWARDS}:by_length",
    }
    m = train_rl(_cfg(tmp_path, data, **over))
    h = _history(tmp_path / "out")
    assert m["metrics"]["global_step"] == 2 and len(h) == 2
    for step in h:
        assert step["sync_greedy_match"] == 1.0, {
            k: v for k, v in step.items() if k != "samples"
        }  # vLLM answers as the updated policy does
        assert step["sync_greedy_changed"] > 0, step  # ... and no longer as the old one did
        assert step["seconds"]["sync"] > 0
    # (the re-run that resumed here and synced the restored weights went with issue 27: the
    # async pool test below resumes through the same Sampler.restore, which syncs either engine)


# -- rollouts from a pool of engine actors ------------------------------------------------------------
POOL = {"rollout.placement": "pool", "rollout.cpus_per_engine": 1.0, "scaling.cpus_per_worker": 1.0}


@pytest.mark.slow
def test_async_ppo_learns_one_version_behind_and_syncs(ray_local, tmp_path):
    """ppo.mode=async, one hf engine actor beside the trainer: the reward rises as in the sync
    learning test, while every batch after the first was sampled by the previous policy
    version (staleness 1, never more) and carries behaviour log-probs; the weights reach the
    engine after every update (its greedy answers equal the trainer's). Resume: the next test."""
    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl")
    over = {
        **POOL,
        "ppo.mode": "async",
        "rollout.check_sync": "true",
        **LEARNING,
        "checkpoint.every_steps": 30,
        "monitor.every": 30,
    }
    m = train_rl(_cfg(tmp_path, data, **over))
    h = _history(tmp_path / "out")
    assert m["metrics"]["global_step"] == 30
    first = sum(x["reward"] for x in h[:10]) / 10
    last = sum(x["reward"] for x in h[-10:]) / 10
    assert last >= first + 0.2, (first, last)
    assert [x["staleness"] for x in h] == [0.0] + [1.0] * 29
    assert [x["policy_version"] for x in h] == list(range(1, 31))
    for x in h:
        assert x["sync_greedy_match"] == 1.0 and x["sync_bytes"] > 0 and x["seconds"]["sync"] > 0
        assert 0.5 < x["is_weight_mean"] <= 2.0 and x["regenerated_stale"] == 0


@pytest.mark.slow
def test_async_grpo_learns_in_the_same_loop_without_a_value_model(ray_local, tmp_path):
    """GRPO on the pool, async: 4 prompts × 4 answers per step, each answer's advantage from its
    group, the KL a loss term; the reward rises on the same task as PPO's with the same lag
    bound, and no value model is built or written."""
    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl")
    over = {
        **POOL,
        **LEARNING,
        "algo": "grpo",
        "ppo.mode": "async",
        "ppo.group_size": 4,
        "ppo.rollout_batch": 4,
        "checkpoint.every_steps": 30,
        "monitor.every": 30,
    }
    m = train_rl(_cfg(tmp_path, data, **over))
    h = _history(tmp_path / "out")
    assert m["loop"] == "cai-ray" and m["metrics"]["global_step"] == 30
    first = sum(x["reward"] for x in h[:10]) / 10
    last = sum(x["reward"] for x in h[-10:]) / 10
    assert last >= first + 0.2, (first, last)
    assert [x["staleness"] for x in h] == [0.0] + [1.0] * 29
    for x in h:
        assert "value_loss" not in x and x["kl_loss"] >= 0 and 0 <= x["flat_groups"] <= 1
    assert any(x["group_reward_std"] > 0 for x in h)
    assert (tmp_path / "out" / "model" / "config.json").exists() and not (tmp_path / "out" / "value").exists()


def test_rloo_with_lora_on_the_pool_syncs_adapters_and_resumes_without_a_value_model(ray_local, tmp_path):
    """RLOO in our loop, sync, on an hf engine actor, training LoRA adapters: only the adapters
    travel and the engine answers as the trainer after each sync; a re-run with more steps
    resumes from the checkpoint (the policy alone: no value model is saved or restored)."""
    from transformers import AutoModelForCausalLM

    from cai_ray.models import resolve_model
    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl")
    over = {
        **POOL,
        "algo": "rloo",
        "ppo.group_size": 2,
        "ppo.rollout_batch": 2,
        "lora.enabled": "true",
        "lora.r": 4,
        "lora.dropout": 0.0,
        "rollout.check_sync": "true",
        "optim.learning_rate": 0.05,
        "ppo.steps": 3,
    }
    m = train_rl(_cfg(tmp_path, data, **over))
    assert m["loop"] == "cai-ray" and m["metrics"]["global_step"] == 3
    full = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random")).parameters())
    for x in _history(tmp_path / "out"):
        assert x["sync_greedy_match"] == 1.0 and 0 < x["sync_bytes"] < 0.05 * full, x
        assert "value_loss" not in x and "kl_loss" not in x  # RLOO: the KL is in the score
    m = train_rl(_cfg(tmp_path, data, **{**over, "ppo.steps": 4}))
    h = _history(tmp_path / "out")
    assert m["metrics"]["resumed_from"] == 3 and [x["step"] for x in h] == [1, 2, 3, 4]
    assert [x["policy_version"] for x in h] == [1, 2, 3, 4]
    assert not (tmp_path / "out" / "value").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.slow
def test_async_ppo_continues_after_its_driver_is_killed(ray_local, tmp_path):
    """`cai-ray train ppo --async` killed (SIGKILL, the whole process group: driver, Ray, the
    trainer and the engine actor) once its first checkpoint is registered; the same run again
    continues from the checkpoint: no step twice or missing, the policy version carries on, the
    first batch after the restart is sampled by the restored policy (staleness 0) and the
    reward history before the kill comes back with the checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from cai_ray.train.ppo.loop import train_rl

    data = _prompts(tmp_path / "p.jsonl")
    # 12 steps of ~0.5 s: the run must still be going when its first checkpoint is seen (Ray
    # Train's controller registers it at its next poll, up to 2 s later)
    steps = 12
    over = {**POOL, "ppo.mode": "async", "ppo.steps": steps, "checkpoint.every_steps": 2, "monitor.every": 50}
    # one critic warm-up step: the policy version runs one behind the step count, so a resume
    # that lost the saved version (and counted steps instead) is caught
    over["ppo.critic_warmup_steps"] = 1
    cfg = _cfg(tmp_path, data, **over)  # the same settings as the command below
    args = [f"{k}={v}" for k, v in {**BASE, "data": data, "output": tmp_path / "out", **over}.items() if v is not None]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cai_ray.cli", "train", "ppo", *args],
        env={**os.environ, "RAY_ADDRESS": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=root,
        start_new_session=True,
    )
    snapshot = tmp_path / "out" / "ray" / "ppo" / "checkpoint_manager_snapshot.json"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            try:
                if json.loads(snapshot.read_text())["checkpoint_results"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("no checkpoint registered in 300 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (tmp_path / "out" / "metrics.json").exists()  # killed before it finished

    m = train_rl(cfg)
    h = _history(tmp_path / "out")
    resumed = m["metrics"]["resumed_from"]
    assert resumed in range(2, steps, 2) and m["metrics"]["global_step"] == steps
    assert [x["step"] for x in h] == list(range(1, steps + 1))
    assert [x["policy_version"] for x in h] == list(range(steps))  # 0 after the warm-up step
    assert [x["staleness"] for x in h[resumed:]] == [0.0] + [1.0] * (steps - 1 - resumed)


@pytest.mark.slow
def test_vllm_pool_takes_zero3_weights_through_vllms_weight_transfer_api(ray_local, tmp_path):
    """Two trainer ranks at ZeRO-3 and one vLLM engine actor (its CPU build), async: each
    update's parameters are gathered one at a time, streamed in small buckets through the
    object store and loaded through vLLM's weight-transfer API; after every transfer vLLM's
    greedy answers equal the training policy's (a high learning rate makes every update
    visible), and the behaviour log-probs come from vLLM's sampler."""
    from cai_ray.train.ppo.loop import train_rl

    over = {
        **POOL,
        "ppo.mode": "async",
        "model": "tiny-random-wide",
        "rollout.engine": "vllm",
        "scaling.workers": 2,
        "scaling.cpus_per_worker": 0.5,
        "zero": 3,
        "rollout.check_sync": "true",
        "rollout.sync_bucket_mb": 1,
        "ppo.steps": 3,
        "optim.learning_rate": 0.05,
        "rollout.max_new_tokens": 6,
        "optim.per_worker_batch_size": 2,
        "reward.function": f"{REWARDS}:by_length",
        "checkpoint.every_steps": 3,
    }
    m = train_rl(_cfg(tmp_path, _prompts(tmp_path / "p.jsonl"), **over))
    h = _history(tmp_path / "out")
    assert m["metrics"]["global_step"] == 3
    for x in h:
        assert x["sync_greedy_match"] == 1.0, {k: v for k, v in x.items() if k != "samples"}
        assert x["sync_buckets"] > 1 and x["sync_bytes"] > 1e6 and x["staleness_max"] <= 1
        assert x["is_weight_mean"] > 0
    assert [x["staleness"] for x in h] == [0.0, 1.0, 1.0]


@pytest.mark.slow
def test_lora_ppo_sends_only_the_adapter_to_a_vllm_pool(ray_local, tmp_path):
    """lora.enabled: the policy trains adapters only; each sync carries the adapters (a small
    share of the model's bytes) and vLLM serves them as a LoRARequest whose greedy answers equal
    the trainer's; OUTPUT/model is the base with the adapters merged in."""
    from transformers import AutoModelForCausalLM

    from cai_ray.train.ppo.loop import train_rl

    over = {
        **POOL,
        "ppo.mode": "async",
        "model": "tiny-random-wide",
        "rollout.engine": "vllm",
        "lora.enabled": "true",
        "lora.r": 4,
        "lora.dropout": 0.0,
        "rollout.check_sync": "true",
        "ppo.steps": 2,
        "optim.learning_rate": 0.05,
        "rollout.max_new_tokens": 6,
        "reward.function": f"{REWARDS}:by_length",
    }
    m = train_rl(_cfg(tmp_path, _prompts(tmp_path / "p.jsonl"), **over))
    h = _history(tmp_path / "out")
    assert m["metrics"]["global_step"] == 2
    for x in h:
        assert x["sync_greedy_match"] == 1.0, {k: v for k, v in x.items() if k != "samples"}
        assert 0 < x["sync_bytes"] < 0.05 * 49e6  # the adapters, not the 49 MB model
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())
