"""The bad-input corpus (tests/data/bad_inputs/) through generate, label, train and eval:
every malformed row is a reject with its reason (or, where nothing usable is left, one
clear error line), the good rows are written, and nothing ends in a traceback."""

import pytest
from support.bad_inputs import CORPUS, _tracebacks

from cai_ray.cli import main


@pytest.mark.parametrize("trainer", ["sft", "rm", "dpo"])
def test_the_corpus_through_train_is_one_clear_error(trainer, tmp_path, capsys):
    argv = ["train", trainer, "--data", str(CORPUS / "train.jsonl"), "--output", str(tmp_path / "o")]
    rc = main([*argv, "--model", "tiny-random"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable rows" in err and not _tracebacks(err), err


def test_the_corpus_through_eval_inputs():
    from cai_ray.eval.run import load_set

    rows, rejects = load_set(str(CORPUS / "prompts.jsonl"), "harmful", None, 32000)
    reasons = " | ".join(r["reason"] for r in rejects)
    assert all(r["reason"] for r in rejects)
    for want in ("invalid JSON", "empty prompt", "needs 'prompt'", "not valid UTF-8", "lone surrogate", "duplicate id"):
        assert want in reasons, want
    assert {r["category"] for r in rows} >= {"uncategorised"}
    # every line is a row or a reject
    lines = (CORPUS / "prompts.jsonl").read_bytes().count(b"\n")
    assert len(rows) + len(rejects) == lines
