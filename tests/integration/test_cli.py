import json

import pytest

from cai_ray.cli import main


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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clamp", "0.6,0.4"], "clamp_low/clamp_high: need 0 <= low <= 0.5 <= high <= 1"),
        (["--min-margin", "0.7"], "filter.min_margin: must be in [0, 0.5]"),
        (["--samples", "1", "--policy", "tiny-random"], "pairs.samples: must be >= 2"),
        (["method.principles_per_pare=2"], "did you mean 'principles_per_pair'"),
        (["method.both_orders=false", "--drop-inconsistent"], "needs method.both_orders=true"),
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
            "method.cot_max_new_tokens=6",
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
    assert m["config"]["method"]["clamp_low"] == 0.3 and m["config"]["method"]["cot"] is True
    # tiny-random writes no "(A)"/"(B)": every CoT comparison is invalid, counted, never coerced
    assert m["labels"]["invalid"] == m["labels"]["pairs"] == 2 and m["labels"]["labels"] == 0


def test_train_rm_cli_end_to_end(ray_local, tmp_path, capsys):
    from support.train import preference_toy

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
