"""The bad-input corpus (tests/data/bad_inputs/) through generate, label, train and eval:
every malformed row is a reject with its reason (or, where nothing usable is left, one
clear error line), the good rows are written, and nothing ends in a traceback."""

import json
import shutil
from pathlib import Path

from support.bad_inputs import CORPUS, _tracebacks

from cai_ray.cli import main

TINY = ["--model", "tiny-random", "--max-new-tokens", "4", "--actors", "1,1", "engine.dtype=float32"]


def _rejects(out: Path) -> dict[tuple[str, int], str]:
    rows = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return {(Path(r["source"]).name, r["line"]): r["reason"] for r in rows}


def test_the_corpus_through_generate(ray_local, tiny_model, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("prompts.jsonl", "prompts.csv"):
        shutil.copy(CORPUS / name, inp / name)
    out = tmp_path / "sl"
    assert main(["generate", "--input", str(inp), "--output", str(out), "--revisions", "1", *TINY]) == 0
    captured = capsys.readouterr()
    assert not _tracebacks(captured.out + captured.err)
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["read"] == c["written"] + c["rejected"]
    rejects = _rejects(out)
    expected = json.loads((CORPUS / "prompts_expected.json").read_text())
    for line, want in enumerate(expected, 1):
        got = rejects.get(("prompts.jsonl", line))
        if want is None:
            assert got is None, (line, got)
        else:
            assert got and want in got, (line, want, got)
    csv_reasons = sorted(r for (src, _), r in rejects.items() if src == "prompts.csv")
    assert len(csv_reasons) == 4, csv_reasons  # bad byte, oversized field, extra field, empty prompt
    assert any("undecodable byte" in r for r in csv_reasons) and any("unreadable CSV row" in r for r in csv_reasons)
    good_jsonl = sum(w is None for w in expected)
    assert c["written"] == good_jsonl + 2  # + the two good CSV rows


def test_the_corpus_through_label(ray_local, tiny_model, tmp_path, capsys):
    out = tmp_path / "labels"
    argv = ["label", "--input", str(CORPUS / "pairs.jsonl"), "--output", str(out), "--labeler", "tiny-random"]
    assert main([*argv, "labeler.dtype=float32", "labeler_pool.batch_size=4"]) == 0
    captured = capsys.readouterr()
    assert not _tracebacks(captured.out + captured.err)
    from cai_ray.batch.stage import read_output

    reasons = " | ".join(_rejects(out).values())
    for want in (
        "no response_b",
        "identical",
        "must be a string",
        "empty response_a",
        "sampled pair",
        "lone surrogate",
    ):
        assert want in reasons, want
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["read"] == 9 and m["counts"]["rejected"] == 6 and m["counts"]["written"] == 3
    # the over-long pair is labelled "invalid: too long" in filtered/, not dropped
    filtered = read_output(out, ["id", "filter_reason"], ("filtered",)).to_pylist()
    assert any(
        r["id"] == "g7" and r["filter_reason"].startswith("invalid: too long for the labeler: ") for r in filtered
    ), filtered
