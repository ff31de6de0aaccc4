"""The whole method as one run: config wiring and errors, the pipeline end to end with tiny-random
(every artifact present and linked in pipeline.json, a crash resumed, finished stages skipped),
and one slow run with the embedded SmolLM2 on a few prompts."""

import pytest
from support.pipeline import ROOT, _load

from cai_ray.config import ConfigError, load_config
from cai_ray.pipeline.config import PipelineConfig


def test_every_stage_is_wired_to_the_one_before(tmp_path):
    from cai_ray.pipeline.run import stage_configs

    pc = _load(tmp_path)
    stages = {s.name: s for s in stage_configs(pc)}
    run = (tmp_path / "run").resolve()
    assert list(stages) == ["generate", "sft", "label", "rm", "ppo", "eval"]  # each its command's name
    assert all(s.output == run / s.name for s in stages.values())  # and its folder's
    assert stages["generate"].cfg.input == pc.prompts and stages["generate"].cfg.engine.model == "tiny-random"
    assert stages["sft"].cfg.data == str(run / "generate") and stages["sft"].cfg.model == "tiny-random"
    assert stages["label"].cfg.policy.model == str(run / "sft" / "model")
    assert stages["label"].cfg.labeler.model == "tiny-random"
    assert stages["rm"].cfg.data == str(run / "label") and stages["rm"].cfg.model == str(run / "sft" / "model")
    rl = stages["ppo"].cfg
    assert rl.model == str(run / "sft" / "model") and rl.reward.model == str(run / "rm" / "model")
    ev = stages["eval"].cfg
    assert ev.models == ["base=tiny-random", f"sl-cai={run / 'sft' / 'model'}", f"rl-cai={run / 'ppo' / 'model'}"]
    assert ev.baseline == "base" and ev.judge.model == "tiny-random"
    # the stage sections keep their own settings
    assert stages["generate"].cfg.revisions == 1 and rl.ppo.steps == 1
    # rl=dpo: no preference model, DPO on the labels
    dpo = {s.name: s for s in stage_configs(_load(tmp_path, "rl=dpo"))}
    assert (
        "rm" not in dpo
        and dpo["dpo"].cfg.data == str(run / "label")
        and dpo["dpo"].output == run / "dpo"
        and type(dpo["dpo"].cfg).__name__ == "DPOTrainConfig"
        and dpo["eval"].cfg.models[-1] == f"rl-cai={run / 'dpo' / 'model'}"
    )
    assert set(dpo["dpo"].produces) == {"dpo_model"} and set(stages["generate"].produces) == {"generate_data"}


@pytest.mark.parametrize(
    "over, match",
    [
        (["sft.data=/elsewhere"], r"sft\.data: set by the pipeline"),
        (["ppo.reward.model=/x"], r"ppo\.reward\.model: set by the pipeline"),
        (["sft.optim.lerning_rate=1"], r"sft: unknown config key 'optim\.lerning_rate'"),
        (["rl=grpo"], "rl: must be ppo or dpo"),
        (["eval.harmful="], "eval: harmful: required"),
        (["label.pairs.samples=1"], r"label: pairs\.samples: must be >= 2"),
        (["prompts="], "prompts: required"),
        (["stages=[x]"], "unknown config key 'stages'"),
    ],
)
def test_pipeline_config_errors_name_the_stage_and_key(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, *over)


def test_gpu_pipeline_config_validates():
    pc = load_config(PipelineConfig, ROOT / "jobs" / "configs" / "pipeline_gpu.yaml")
    from cai_ray.pipeline.run import stage_configs

    stages = {s.name: s.cfg for s in stage_configs(pc)}
    assert stages["generate"].engine.backend == "vllm" and stages["generate"].input.startswith("s3://")
    assert stages["ppo"].rollout.engine == "vllm" and stages["ppo"].data == pc.rl_prompts
    assert stages["eval"].judge.backend == "vllm"


def test_redo_and_until_name_a_stage_of_this_pipeline(tmp_path):
    from cai_ray.pipeline.run import run_pipeline

    with pytest.raises(ConfigError, match=r"--redo: unknown stage 'rm'; this pipeline's stages \(rl=dpo\)"):
        run_pipeline(_load(tmp_path, "rl=dpo"), redo="rm")
    with pytest.raises(ConfigError, match="--until: unknown stage 'train'"):
        run_pipeline(_load(tmp_path), until="train")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_rl_stages_old_name_still_means_it_for_a_release(tmp_path, caplog):
    """`--until rl` named the RL-CAI stage before each stage had its command's name."""
    from cai_ray.pipeline.run import run_pipeline

    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match=r"--redo: unknown stage 'rm'"):
        run_pipeline(_load(tmp_path, "rl=dpo"), redo="rm", until="rl")  # until=rl is dpo here: accepted
    assert "stage 'rl' is now 'dpo'" in caplog.text


def test_folder_inputs_and_model_weights_are_fingerprinted(tmp_path):
    """A retrained model (same config, new weights) or a changed file in a folder input is a
    new fingerprint; what every run rewrites (manifests, locks, logs) is not."""
    import os

    from cai_ray.pipeline.run import _file_sha
    from cai_ray.runtime import model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w" * 10)
    before, mf = _file_sha(str(model)), model_fingerprint(str(model))
    for volatile in ("manifest.json", ".lock", "logs/run.log"):
        (model / volatile).parent.mkdir(exist_ok=True)
        (model / volatile).write_text("changes every run")
    assert _file_sha(str(model)) == before
    (model / "model.safetensors").write_bytes(b"v" * 10)  # retrained: same size, new time
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert _file_sha(str(model)) != before
    assert model_fingerprint(str(model))["weights_stat_sha256"] != mf["weights_stat_sha256"]
    assert _file_sha(str(tmp_path / "missing")) is None


def test_the_demo_keeps_the_terminal_quiet_and_the_logs_in_a_file(tmp_path):
    """runtime.output_to_log: the caller's own lines reach the terminal; print(), stderr and
    a child process's output (what Ray's relayed worker logs, DeepSpeed and vLLM write) go
    to the log file; the last lines of the log are at hand for a failure message."""
    import subprocess
    import sys

    log = tmp_path / "logs" / "demo.log"
    code = f"""
import subprocess, sys
from pathlib import Path
from cai_ray.runtime import output_to_log, tail
with output_to_log(Path({str(log)!r})) as console:
    console.write("stage line\\n")
    print("noise from a library")
    print("a warning", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import sys; print('worker log'); print('worker err', file=sys.stderr)"])
    console.write("summary\\n")
print("after: terminal again")
print("TAIL=" + tail(Path({str(log)!r}), 1))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["stage line", "summary", "after: terminal again", "TAIL=worker err"], r.stdout
    assert r.stderr == ""
    text = log.read_text()
    for line in ("noise from a library", "a warning", "worker log", "worker err"):
        assert line in text


def test_prune_checkpoints_removes_a_finished_trainers_ray_folder_and_says_so(tmp_path):
    """The demo prunes: a training stage's OUTPUT/ray goes, its model and manifest stay and the
    manifest names what went. Checkpoints in the user's own storage and stages that do not
    train are left alone."""
    import json

    from cai_ray.pipeline.run import _prune_checkpoints, stage_configs

    stages = {s.name: s for s in stage_configs(_load(tmp_path))}
    for s in stages.values():
        (s.output / "ray" / "ckpt").mkdir(parents=True)
        (s.output / "ray" / "ckpt" / "optim.pt").write_bytes(b"x" * 4096)
        (s.output / "model").mkdir()
        (s.output / "manifest.json").write_text(json.dumps({"status": "finished", "checkpoint": "ray/ckpt"}))
    rec = _prune_checkpoints(stages["sft"])
    sft = stages["sft"].output
    assert not (sft / "ray").exists() and (sft / "model").is_dir()
    m = json.loads((sft / "manifest.json").read_text())
    assert m["status"] == "finished" and m["checkpoint"] is None
    assert m["checkpoints"] == rec["checkpoints"] and "pruned" in rec["checkpoints"]
    assert _prune_checkpoints(stages["generate"]) == {} and (stages["generate"].output / "ray").is_dir()
    own = {s.name: s for s in stage_configs(_load(tmp_path, f"rm.checkpoint.storage={tmp_path / 'mine'}"))}["rm"]
    assert _prune_checkpoints(own) == {} and (own.output / "ray" / "ckpt" / "optim.pt").exists()
    assert _prune_checkpoints(stages["sft"]) == {}  # nothing left to prune: a re-run is a no-op
