"""The whole method as one run: config wiring and errors, the pipeline end to end with tiny-random
(every artifact present and linked in pipeline.json, a crash resumed, finished stages skipped),
and one slow run with the embedded SmolLM2 on a few prompts."""

import json
from pathlib import Path

import pytest
from support.pipeline import DEMO, ROOT, _load

from cai_ray.config import ConfigError


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
    from cai_ray.pipeline import run as pipeline

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
    for art in ("generate_data", "sft_model", "label_data", "rm_model", "ppo_model", "eval_report", "eval_metrics"):
        assert state["artifacts"][art]["produced_by"], art
    assert state["artifacts"]["ppo_model"]["from"] == ["rl_prompts", "rm_model", "sft_model"]
    assert state["artifacts"]["sft_model"]["from"] == ["base_model", "generate_data"]
    assert state["artifacts"]["prompts"]["sha256"] and state["constitution"]["sha256"]
    _artifacts_linked(state)
    for name, rec in state["stages"].items():
        assert Path(rec["manifest"]).is_file() and rec["config"] and rec["model"], name
        manifest = json.loads(Path(rec["manifest"]).read_text())
        assert manifest["status"] == "finished" and manifest["stage"] == name  # one name: stage, folder, manifest
        assert Path(rec["output"]).name == name
    assert state["stages"]["label"]["constitution_sha256"] == state["constitution"]["sha256"]
    # the demo prunes: each trainer's Ray Train checkpoints went once it finished, its model stayed
    for name in ("sft", "rm", "ppo"):
        assert not (run / name / "ray").exists() and (run / name / "model" / "config.json").exists(), name
        assert "pruned" in state["stages"][name]["checkpoints"], name
    assert state["stages"]["label"]["model"] == "tiny-random"
    assert (run / "ppo" / "model" / "config.json").exists() and (run / "eval" / "report.html").exists()
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(m["models"]) == {"base", "sl-cai", "rl-cai"}
    # the SFT data is the SL-CAI output, and its manifest records where it came from
    sft_manifest = json.loads(Path(state["stages"]["sft"]["manifest"]).read_text())
    assert sft_manifest["data"]["manifest"]["stage"] == "generate"

    # a third run has nothing to do; a changed setting of a finished stage is refused, naming it
    state = pipeline.run_pipeline(_load(tmp_path))
    assert all(v["runs"] == (2 if k == "rm" else 1) for k, v in state["stages"].items())
    with pytest.raises(ConfigError, match=r"stage sft .*changed: config\.optim\.learning_rate.*--redo sft"):
        pipeline.run_pipeline(_load(tmp_path, "sft.optim.learning_rate=1e-3"))
    # --redo STAGE deletes that stage's output and runs it again with the new settings
    state = pipeline.run_pipeline(_load(tmp_path, "eval.limit=1"), redo="eval")
    assert state["stages"]["eval"]["runs"] == 1 and state["stages"]["ppo"]["runs"] == 1
    assert json.loads((run / "eval" / "metrics.json").read_text())["prompts"] == {"harmful": 1, "benign": 1}
    with pytest.raises(ConfigError, match="--redo: unknown stage 'dpo'"):
        pipeline.run_pipeline(pc, redo="dpo")


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
        # the principle table is eval's own test (test_eval.py); here it was 18 principles x 3
        # models x 2 orders of SmolLM2 judgements, ~20 s, for wiring this test does not check
        "eval.per_principle=false",
        "dpo.optim.max_steps=1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "=== cai-ray pipeline: finished ===" in out and "attack success" in out and "report.html" in out
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert list(state["stages"]) == ["generate", "sft", "label", "dpo", "eval"]
    assert state["stages"]["generate"]["model"] == "smollm2"
    assert not (tmp_path / "run" / "sft" / "ray").exists() and not (tmp_path / "run" / "dpo" / "ray").exists()
    _artifacts_linked(state)
