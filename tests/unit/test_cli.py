import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai_ray.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_package_pulls_in_no_heavy_modules():
    code = (
        "import sys, cai_ray, cai_ray.cli, cai_ray.config, cai_ray.core.constitution, cai_ray.core.prompts, "
        "cai_ray.engine; print([m for m in ('ray', 'torch', 'vllm', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_constitution_validate_and_show(capsys, tmp_path):
    files = [str(p) for p in sorted((ROOT / "constitutions").glob("*.yaml"))]
    assert main(["constitution", "validate", *files]) == 0
    assert "ok (general" in capsys.readouterr().out

    data = yaml.safe_load((ROOT / "constitutions" / "tutor.yaml").read_text())
    data["principles"][2]["weight"] = "heavy"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["constitution", "validate", files[0], str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: principle 'student-safety' (#3): field 'weight'" in err

    assert main(["constitution", "show", files[0]]) == 0
    out = capsys.readouterr().out
    assert "non-evasive" in out and "P(draw)" in out
    assert main(["constitution", "show", "--json", files[0]]) == 0
    assert json.loads(capsys.readouterr().out)["name"]


def test_generate_help_lists_config_keys():
    out = subprocess.run(
        [sys.executable, "-m", "cai_ray.cli", "generate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for key in ("--actors MIN,MAX", "sampling.max_new_tokens", "pool.cpus_per_actor", "--address"):
        assert key in out


def test_generate_rejects_a_wrong_config_key(capsys, tmp_path):
    rc = main(["generate", "--input", "x.jsonl", "--output", str(tmp_path), "sampling.temprature=0"])
    assert rc == 2
    assert "did you mean 'temperature'" in capsys.readouterr().err


def test_bad_actors_flag():
    with pytest.raises(SystemExit):
        main(["generate", "--input", "x", "--output", "y", "--actors", "3,1"])


def test_label_help_lists_config_keys_and_flags():
    out = subprocess.run(
        [sys.executable, "-m", "cai_ray.cli", "label", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for key in (
        "--policy MODEL",
        "--labeler MODEL",
        "--samples K",
        "--principles-per-pair K",
        "--cot",
        "--clamp LO,HI",
        "--min-margin X",
        "--gold",
        "method.both_orders",
        "filter.drop_inconsistent",
        "labeler_pool.batch_size",
        "pairs.pairing",
    ):
        assert key in out


@pytest.mark.parametrize("trainer,key", [("sft", "mix"), ("rm", "targets"), ("dpo", "beta")])
def test_train_help_lists_flags_and_config_keys(capsys, trainer, key):
    with pytest.raises(SystemExit):
        main(["train", trainer, "--help"])
    out = capsys.readouterr().out
    for text in ("--lora", "--zero", "--workers", "lora.merge", "checkpoint.max_failures", key):
        assert text in out, text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "sft", "--data", "d", "--output", "o", "optim.lerning_rate=1"], "did you mean 'learning_rate'"),
        (["train", "sft", "--data", "d", "--output", "o", "--mix", "helpful.jsonl"], "FILE:RATIO"),
        (["train", "rm", "--data", "d", "--output", "o", "eval_fraction=1.5"], "eval_fraction: must be in [0, 1)"),
        (["train", "dpo", "--data", "d", "--output", "o", "loss_type=nope"], "loss_type: must be one of"),
        (["train", "rm", "--output", "o"], "data: required"),
    ],
)
def test_train_config_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_train_data_errors_are_one_line_and_exit_2(capsys, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "same", "rejected": "same"}\nnot json\n')
    assert main(["train", "rm", "--data", str(bad), "--output", str(tmp_path / "o"), "--model", "tiny-random"]) == 2
    err = capsys.readouterr().err
    assert "no usable rows" in err and "identical" in err and "invalid JSON" in err


def test_train_ppo_async_flag_sets_the_pool_and_the_mode():
    from cai_ray.cli import _load, build_parser
    from cai_ray.train.ppo.config import RLTrainConfig

    base = ["train", "ppo", "--prompts", "x.jsonl", "--output", "o", "--reward-model", "rm"]
    cfg = _load(RLTrainConfig, build_parser().parse_args([*base, "--async"]), "")
    assert (cfg.rollout.placement, cfg.ppo.mode) == ("pool", "async")
    cfg = _load(RLTrainConfig, build_parser().parse_args(base), "")
    assert (cfg.rollout.placement, cfg.ppo.mode) == ("colocated", "sync")
