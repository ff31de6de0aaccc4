import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_package_pulls_in_no_heavy_modules():
    code = (
        "import sys, cai_ray, cai_ray.cli, cai_ray.config, cai_ray.constitution, cai_ray.prompts, "
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


def test_cli_end_to_end(ray_local, tiny_model, tmp_path, capsys):
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "hello"}\n{"prompt": ""}\n')
    rc = main(
        [
            "generate",
            "--input",
            str(inp),
            "--output",
            str(tmp_path / "o"),
            "--model",
            "tiny-random",
            "--revisions",
            "1",
            "--max-new-tokens",
            "4",
            "--actors",
            "1,1",
            "--batch-size",
            "2",
            "--seed",
            "3",
            "engine.dtype=float32",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "read 2 rows: written 1" in out and "rejected 1" in out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 3 and manifest["config"]["pool"]["batch_size"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--input", "/nonexistent.jsonl"], "input not found"),
        (["--constitution", "/nonexistent.yaml"], "file not found"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--engine", "vllm", "pool.gpus_per_actor=1"], "needs 1 GPU (1 actors x 1) but the Ray cluster has 0"),
        (["pool.cpus_per_actor=1000"], "CPUs of this machine, and the job would stall"),
        (["--actors", "1000,1000"], "or give actors a fraction (e.g. pool.cpus_per_actor="),
    ],
)
def test_generate_fails_fast_with_a_clear_error(ray_local, tmp_path, capsys, extra, message):
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "hello"}\n')
    # later flags win, so each case's flags override these defaults
    args = ["generate", "--input", str(inp), "--output", str(tmp_path / "o"), "--model", "tiny-random"]
    rc = main(args + extra)
    assert rc == 2
    assert message in capsys.readouterr().err


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
        "label.both_orders",
        "filter.drop_inconsistent",
        "labeler_pool.batch_size",
        "pairs.pairing",
    ):
        assert key in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clamp", "0.6,0.4"], "clamp_low/clamp_high: need 0 <= low <= 0.5 <= high <= 1"),
        (["--min-margin", "0.7"], "filter.min_margin: must be in [0, 0.5]"),
        (["--samples", "1", "--policy", "tiny-random"], "pairs.samples: must be >= 2"),
        (["label.principles_per_pare=2"], "did you mean 'principles_per_pair'"),
        (["label.both_orders=false", "--drop-inconsistent"], "needs label.both_orders=true"),
        (["--labeler", "no-such-model"], "unknown model 'no-such-model'"),
        (["--gold", "/nonexistent.jsonl"], "not found"),
    ],
)
def test_label_fails_fast_with_a_clear_error(ray_local, tmp_path, capsys, extra, message):
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "hello", "response_a": "x", "response_b": "y"}\n')
    args = ["label", "--input", str(inp), "--output", str(tmp_path / "o"), "--labeler", "tiny-random"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_label_cli_end_to_end(ray_local, tiny_model, tmp_path, capsys):
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "hello"}\n{"prompt": ""}\n{"prompt": "bye"}\n')
    rc = main(
        [
            "label",
            "--input",
            str(inp),
            "--output",
            str(tmp_path / "o"),
            "--policy",
            "tiny-random",
            "--labeler",
            "tiny-random",
            "--samples",
            "2",
            "--principles-per-pair",
            "2",
            "--cot",
            "--clamp",
            "0.3,0.7",
            "--actors",
            "1",
            "--batch-size",
            "2",
            "sampling.max_new_tokens=6",
            "label.cot_max_new_tokens=6",
            "policy.dtype=float32",
            "labeler.dtype=float32",
            "policy_pool.cpus_per_actor=0.5",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "read 3 rows: written 2" in out and "rejected 1" in out
    assert "labeler: mean margin" in out and "position bias" in out
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["config"]["label"]["clamp_low"] == 0.3 and m["config"]["label"]["cot"] is True
    # tiny-random writes no "(A)"/"(B)": every CoT comparison is invalid, counted, never coerced
    assert m["labels"]["invalid"] == m["labels"]["pairs"] == 2 and m["labels"]["labels"] == 0


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


def test_train_rm_cli_end_to_end(ray_local, tmp_path, capsys):
    from test_train import preference_toy

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_toy(40, 0.9)))
    out = tmp_path / "rm"
    assert (
        main(
            [
                "train",
                "rm",
                "--data",
                str(data),
                "--output",
                str(out),
                "--model",
                "tiny-random",
                "--workers",
                "1",
                "--max-steps",
                "4",
                "--zero",
                "2",
                "eval_fraction=0.2",
                "scaling.cpus_per_worker=1",
                "optim.learning_rate=1e-3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "trained 4 steps on" in printed and "held out" in printed and "calibration plot" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["targets"] == "soft" and m["metrics"]["eval"]["pairs"] == m["split"]["held_out"]
    assert (out / "model" / "config.json").exists() and (out / "rejects.jsonl").read_text() == ""
