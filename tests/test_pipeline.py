"""The whole method as one run: config wiring and errors, the pipeline end to end with tiny-random
(every artifact present and linked in pipeline.json, a crash resumed, finished stages skipped),
and one slow run with the embedded SmolLM2 on a few prompts."""

import json
from pathlib import Path

import pytest

from cai_ray.config import ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "configs" / "demo.yaml"

# the demo config made tiny: tiny-random everywhere, a few tokens, one or two steps
TINY = [
    "model=tiny-random",
    "generate.engine.dtype=float32",
    "generate.sampling.max_new_tokens=8",
    "generate.pool.cpus_per_actor=0.5",
    "sft.optim.epochs=1.0",
    "sft.optim.max_length=256",
    "label.sampling.max_new_tokens=8",
    "label.policy.dtype=float32",
    "label.labeler.dtype=float32",
    "label.policy_pool.cpus_per_actor=0.25",
    "label.labeler_pool.cpus_per_actor=0.5",
    "rm.optim.epochs=1.0",
    "rm.optim.max_length=256",
    "ppo.optim.max_length=256",
    "ppo.rollout.max_new_tokens=4",
    "ppo.ppo.steps=1",
    "ppo.ppo.rollout_batch=4",
    "ppo.monitor.every=1",
    "ppo.monitor.probe_max_new_tokens=4",
    "dpo.optim.max_length=256",
    "eval.limit=2",
    "eval.engine.dtype=float32",
    "eval.judge.dtype=float32",
    "eval.sampling.max_new_tokens=8",
    "eval.cpus_per_engine=0.5",
]


def _load(tmp_path, *over):
    return load_config(PipelineConfig, DEMO, [f"output={tmp_path / 'run'}", *TINY, *over])


def test_every_stage_is_wired_to_the_one_before(tmp_path):
    from cai_ray.pipeline import stage_configs

    pc = _load(tmp_path)
    stages = {s.name: s for s in stage_configs(pc)}
    run = (tmp_path / "run").resolve()
    assert list(stages) == ["generate", "sft", "label", "rm", "rl", "eval"]
    assert stages["generate"].cfg.input == pc.prompts and stages["generate"].cfg.engine.model == "tiny-random"
    assert stages["sft"].cfg.data == str(run / "sl_data") and stages["sft"].cfg.model == "tiny-random"
    assert stages["label"].cfg.policy.model == str(run / "sft" / "model")
    assert stages["label"].cfg.labeler.model == "tiny-random"
    assert stages["rm"].cfg.data == str(run / "labels") and stages["rm"].cfg.model == str(run / "sft" / "model")
    rl = stages["rl"].cfg
    assert rl.model == str(run / "sft" / "model") and rl.reward.model == str(run / "rm" / "model")
    ev = stages["eval"].cfg
    assert ev.models == ["base=tiny-random", f"sl-cai={run / 'sft' / 'model'}", f"rl-cai={run / 'rl' / 'model'}"]
    assert ev.baseline == "base" and ev.judge.model == "tiny-random"
    # the stage sections keep their own settings
    assert stages["generate"].cfg.revisions == 1 and rl.ppo.steps == 1
    # rl=dpo: no preference model, DPO on the labels
    dpo = {s.name: s for s in stage_configs(_load(tmp_path, "rl=dpo"))}
    assert (
        "rm" not in dpo
        and dpo["rl"].cfg.data == str(run / "labels")
        and type(dpo["rl"].cfg).__name__ == "DPOTrainConfig"
    )


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
    from cai_ray.pipeline import stage_configs

    stages = {s.name: s.cfg for s in stage_configs(pc)}
    assert stages["generate"].engine.backend == "vllm" and stages["generate"].input.startswith("s3://")
    assert stages["rl"].rollout.engine == "vllm" and stages["rl"].data == pc.rl_prompts
    assert stages["eval"].judge.backend == "vllm"


def _artifacts_linked(state):
    arts = state["artifacts"]
    for name, a in arts.items():
        for parent in a.get("from", []):
            assert parent in arts, (name, parent)
        if a["produced_by"]:
            assert Path(a["path"]).exists(), a
            assert a["produced_by"] in state["stages"]


@pytest.mark.slow
def test_pipeline_end_to_end_resumes_after_a_crash_and_skips_finished_stages(ray_local, tmp_path, monkeypatch, capsys):
    from cai_ray import pipeline

    pc = _load(tmp_path)
    run = Path(pc.output).resolve()

    # a crash in the preference-model stage: the stages before it are recorded as finished
    real = pipeline._job

    def crashing(target):
        job = real(target)
        if target.endswith("train_rm"):

            def boom(cfg):
                raise RuntimeError("node lost")

            boom.target = target
            return boom
        return job

    monkeypatch.setattr(pipeline, "_job", crashing)
    with pytest.raises(RuntimeError, match="node lost"):
        pipeline.run_pipeline(pc)
    state = json.loads((run / "pipeline.json").read_text())
    assert {k: v["status"] for k, v in state["stages"].items()} == {
        "generate": "finished",
        "sft": "finished",
        "label": "finished",
        "rm": "failed",
    }
    assert "node lost" in state["stages"]["rm"]["error"] and state["status"] == "failed"
    monkeypatch.setattr(pipeline, "_job", real)

    # the re-run skips what finished and resumes at the preference model
    capsys.readouterr()
    state = pipeline.run_pipeline(_load(tmp_path))
    printed = capsys.readouterr().out
    for name in ("generate", "sft", "label"):
        assert f"{name}: done earlier, skipped" in printed
        assert state["stages"][name]["runs"] == 1
    assert state["stages"]["rm"]["runs"] == 2 and state["status"] == "finished"
    assert all(v["status"] == "finished" for v in state["stages"].values())

    # every artifact there, and linked: which stage made it from what, with which config
    for art in ("sl_data", "sft_model", "labels", "rm_model", "rl_model", "eval_report", "eval_metrics"):
        assert state["artifacts"][art]["produced_by"], art
    assert state["artifacts"]["rl_model"]["from"] == ["rl_prompts", "rm_model", "sft_model"]
    assert state["artifacts"]["sft_model"]["from"] == ["base_model", "sl_data"]
    assert state["artifacts"]["prompts"]["sha256"] and state["constitution"]["sha256"]
    _artifacts_linked(state)
    for name, rec in state["stages"].items():
        assert Path(rec["manifest"]).is_file() and rec["config"] and rec["model"], name
        assert json.loads(Path(rec["manifest"]).read_text())["status"] == "finished"
    assert state["stages"]["label"]["constitution_sha256"] == state["constitution"]["sha256"]
    assert state["stages"]["label"]["model"] == "tiny-random"
    assert (run / "rl" / "model" / "config.json").exists() and (run / "eval" / "report.html").exists()
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(m["models"]) == {"base", "sl-cai", "rl-cai"}
    # the SFT data is the SL-CAI output, and its manifest records where it came from
    sft_manifest = json.loads(Path(state["stages"]["sft"]["manifest"]).read_text())
    assert sft_manifest["data"]["manifest"]["stage"] == "sl"

    # a third run has nothing to do; a changed setting of a finished stage is refused, naming it
    state = pipeline.run_pipeline(_load(tmp_path))
    assert all(v["runs"] == (2 if k == "rm" else 1) for k, v in state["stages"].items())
    with pytest.raises(ConfigError, match=r"stage sft .*changed: config\.optim\.learning_rate.*--redo sft"):
        pipeline.run_pipeline(_load(tmp_path, "sft.optim.learning_rate=1e-3"))
    # --redo STAGE deletes that stage's output and runs it again with the new settings
    state = pipeline.run_pipeline(_load(tmp_path, "eval.limit=1"), redo="eval")
    assert state["stages"]["eval"]["runs"] == 1 and state["stages"]["rl"]["runs"] == 1
    assert json.loads((run / "eval" / "metrics.json").read_text())["prompts"] == {"harmful": 1, "benign": 1}
    with pytest.raises(ConfigError, match="--redo: unknown stage 'ppo'"):
        pipeline.run_pipeline(pc, redo="ppo")


@pytest.mark.slow
def test_pipeline_with_smollm2_on_a_few_prompts_and_the_cli(ray_local, tmp_path, capsys):
    """The embedded model through every stage (DPO, the cheaper RL) on two prompts."""
    from cai_ray.cli import main

    prompts = tmp_path / "p.jsonl"
    rows = [json.loads(line) for line in (ROOT / "jobs" / "data" / "red_team_tiny.jsonl").read_text().splitlines()][:2]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "pipeline",
        "--config",
        str(DEMO),
        "--output",
        str(tmp_path / "run"),
        "--prompts",
        str(prompts),
        "--rl",
        "dpo",
        "generate.sampling.max_new_tokens=16",
        "sft.optim.epochs=1.0",
        "label.sampling.max_new_tokens=16",
        "eval.limit=2",
        "eval.sampling.max_new_tokens=16",
        "dpo.optim.max_steps=1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "=== cai-ray pipeline: finished ===" in out and "attack success" in out and "report.html" in out
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert list(state["stages"]) == ["generate", "sft", "label", "rl", "eval"]
    assert state["stages"]["generate"]["model"] == "smollm2"
    _artifacts_linked(state)


def test_redo_and_until_name_a_stage_of_this_pipeline(tmp_path):
    from cai_ray.pipeline import run_pipeline

    with pytest.raises(ConfigError, match=r"--redo: unknown stage 'rm'; this pipeline's stages \(rl=dpo\)"):
        run_pipeline(_load(tmp_path, "rl=dpo"), redo="rm")
    with pytest.raises(ConfigError, match="--until: unknown stage 'train'"):
        run_pipeline(_load(tmp_path), until="train")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_folder_inputs_and_model_weights_are_fingerprinted(tmp_path):
    """A retrained model (same config, new weights) or a changed file in a folder input is a
    new fingerprint; what every run rewrites (manifests, locks, logs) is not."""
    import os

    from cai_ray.pipeline import _file_sha
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
