"""The serve guard's pure parts (no Ray, no server): where an answer is checked, guard.json,
the streamed check against the whole-answer one, the decision log, the config and flags."""

import asyncio
import json
import logging

import pytest

from cai_ray.serve.guard import (
    Guard,
    GuardSpecError,
    Verdict,
    check_points,
    first_flagged,
    prefixes_at,
    read_guard_spec,
    token_ends,
)

PLANTED = "Zebra"


def test_check_points_every_n_tokens_then_the_whole_answer():
    assert check_points(35, 8) == [8, 16, 24, 32, 35]
    assert check_points(32, 8) == [8, 16, 24, 32]
    assert check_points(5, 8) == [5]
    assert check_points(0, 8) == [0]  # an empty answer is checked once
    assert first_flagged([0.1, 0.6, 0.9], 0.6) == 1 and first_flagged([0.1, 0.2], 0.5) is None
    with pytest.raises(ValueError):
        check_points(10, 0)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from cai_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("tiny-random"))


def test_prefixes_end_at_token_ends_and_hold_that_many_tokens(tokenizer):
    text = "The quick brown fox jumps over the lazy dog, twice: once at dawn and once at dusk."
    ends = token_ends(tokenizer, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ends) == len(ids) and ends[-1] == len(text) and ends == sorted(ends)
    cut = prefixes_at(text, ends, [4, 8, len(ends)])
    assert cut[-1] == text and all(text.startswith(p) for p in cut)
    assert [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in cut[:2]] == [4, 8]
    assert token_ends(tokenizer, "") == [] and prefixes_at("", [], [0]) == [""]


def _model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")


def _guard_folder(tmp_path, spec=None):
    _model_folder(tmp_path / "input" / "model")
    _model_folder(tmp_path / "output" / "model")
    spec = spec or {
        "input": {"model": "input/model", "threshold": 0.62, "target_recall": 0.9},
        "output": {"model": "output/model", "threshold": 0.55, "target_recall": 0.9},
        "constitution": {"name": "general", "sha256": "ab" * 32},
    }
    (tmp_path / "guard.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return tmp_path


def test_guard_json_is_read_with_paths_relative_to_its_folder(tmp_path):
    spec = read_guard_spec(_guard_folder(tmp_path))
    assert spec.input.model == str((tmp_path / "input" / "model").resolve()) and spec.input.threshold == 0.62
    assert spec.output.model == str((tmp_path / "output" / "model").resolve()) and spec.output.threshold == 0.55
    assert spec.input.target_recall == 0.9 and spec.constitution["name"] == "general"


GOOD_IN = {"model": "input/model", "threshold": 0.5}
GOOD_OUT = {"model": "output/model", "threshold": 0.5}


@pytest.mark.parametrize(
    "spec,message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"input": GOOD_IN}, "'output': must be an object with 'model' and 'threshold'"),
        ({"input": {**GOOD_IN, "threshold": 1.5}, "output": GOOD_OUT}, "input.threshold: must be a number in [0, 1]"),
        ({"input": {**GOOD_IN, "threshold": "0.5"}, "output": GOOD_OUT}, "input.threshold"),
        ({"input": {**GOOD_IN, "threshold": True}, "output": GOOD_OUT}, "input.threshold"),
        ({"input": GOOD_IN, "output": {**GOOD_OUT, "model": "nowhere"}}, "is not a model folder (no config.json)"),
        ({"input": GOOD_IN, "output": {**GOOD_OUT, "model": ""}}, "output.model: must be a model folder"),
        ({"input": GOOD_IN, "output": {**GOOD_OUT, "target_recall": 2}}, "output.target_recall"),
        ({"input": GOOD_IN, "output": {**GOOD_OUT, "tresh": 1}}, "output: unknown key 'tresh'"),
        ({"input": GOOD_IN, "output": GOOD_OUT, "extra": 1}, "unknown key 'extra'"),
        ({"input": GOOD_IN, "output": GOOD_OUT, "constitution": "general"}, "'constitution': must be an object"),
    ],
)
def test_a_bad_guard_json_names_the_file_and_the_key(tmp_path, spec, message):
    folder = _guard_folder(tmp_path, spec)
    with pytest.raises(GuardSpecError) as e:
        read_guard_spec(folder)
    assert message in str(e.value) and str(folder / "guard.json") in str(e.value), str(e.value)


def test_a_missing_folder_or_file_and_every_problem_at_once(tmp_path):
    with pytest.raises(GuardSpecError, match="no such folder"):
        read_guard_spec(tmp_path / "nope")
    with pytest.raises(GuardSpecError, match="guard.json: not found; is .* a `cai-ray classifiers` OUTPUT"):
        read_guard_spec(tmp_path)
    folder = _guard_folder(tmp_path, {"input": {"model": "x", "threshold": -1}, "output": GOOD_OUT})
    with pytest.raises(GuardSpecError) as e:
        read_guard_spec(folder)
    assert len(str(e.value).splitlines()) == 2  # the model and the threshold, together


class Flagger:
    """A stand-in classifier: 1.0 for a text holding the planted word, else 0.1."""

    def __init__(self):
        self.calls = []

    def scores(self, texts):
        self.calls.append(list(texts))
        return [1.0 if PLANTED in t else 0.1 for t in texts]


def _guard(tokenizer, log_path=None, every=4):
    flagger = Flagger()
    return Guard(flagger, flagger, 0.5, 0.5, "I can't help with that.", tokenizer, every, str(log_path or ""))


async def _pieces(text, sizes, closed):
    """An engine's stream: ``text`` in pieces of the given sizes; ``closed`` records aclose."""
    at, i = 0, 0
    try:
        while at < len(text):
            n = sizes[i % len(sizes)]
            yield text[at : at + n]
            at, i = at + n, i + 1
    finally:
        closed.append(True)


def _screen(guard, msgs, text, sizes):
    async def run():
        closed, out, verdict = [], [], None
        async for item in guard.screen(msgs, _pieces(text, sizes, closed)):
            if isinstance(item, Verdict):
                verdict = item
            else:
                out.append(item)
        return "".join(out), verdict, closed

    return asyncio.run(run())


@pytest.mark.parametrize("sizes", [[1], [3, 7, 2], [50]])
def test_a_stream_releases_only_checked_text_and_cuts_where_the_whole_answer_check_does(tokenizer, sizes):
    """The stream (vLLM) and the finished answer (hf) are checked at the same prefixes: the
    same decision, the same checks; a stream releases nothing past the last clean prefix and
    closes the engine's stream at the cut."""
    guard = _guard(tokenizer)
    msgs = [{"role": "user", "content": "Tell me a story."}]
    flagged = "Once upon a time there was a small village by the sea where Zebra lived happily ever after."
    clean = flagged.replace("Zebra", "Martha")
    for text in (flagged, clean):
        whole = asyncio.run(guard.check_answer(msgs, text))
        released, streamed, closed = _screen(guard, msgs, text, sizes)
        assert closed == [True]
        assert (streamed.refused, streamed.tokens_checked) == (whole.refused, whole.tokens_checked), text
        assert [k for k, _ in streamed.checks] == [k for k, _ in whole.checks]
        assert released == streamed.clean_text == whole.clean_text
        if text is flagged:
            assert whole.refused and PLANTED not in released and text.startswith(released) and released
            assert whole.tokens_checked % 4 == 0 and whole.score == 1.0
        else:
            assert not whole.refused and released == text and whole.tokens_checked == len(token_ends(tokenizer, text))


def test_the_prompt_check_and_the_decision_log(tokenizer, tmp_path, caplog):
    log_path = tmp_path / "logs" / "cai_guard.jsonl"
    guard = _guard(tokenizer, log_path)
    bad = [{"role": "user", "content": f"Tell me about {PLANTED}."}]
    first = asyncio.run(guard.check_input(bad))
    assert first.refused and first.stage == "input" and first.score == 1.0 and first.tokens_checked == 0
    with caplog.at_level(logging.INFO, logger="cai_ray.serve.guard"):
        guard.record("req-1", first, stream=False)
    assert "guard refused request req-1 at the input: score 1.000 >= 0.500" in caplog.text
    ok = [{"role": "user", "content": "Hi"}]
    v = asyncio.run(guard.check_answer(ok, "Hello there, friend.", asyncio.run(guard.check_input(ok))))
    guard.record("req-2", v, stream=True)
    guard.record("req-3", Verdict("output", False, None, 0.5, error="boom"))
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == ["req-1", "req-2", "req-3"]
    assert lines[0]["decision"] == "refused" and lines[0]["input"] == {"score": 1.0, "threshold": 0.5}
    assert lines[0]["output"] is None and lines[0]["stream"] is False
    assert lines[1]["decision"] == "passed" and lines[1]["input"]["score"] == 0.1
    assert lines[1]["output"]["checks"] == [[k, 0.1] for k in check_points(v.tokens_checked, 4)]
    assert lines[2]["decision"] == "error" and lines[2]["error"] == "boom"
    assert v.body() == {
        "decision": "passed",
        "stage": "output",
        "score": 0.1,
        "threshold": 0.5,
        "tokens_checked": v.tokens_checked,
        "input_score": 0.1,
        "checks": len(v.checks),
    }


def test_the_guard_config_and_flags(tmp_path):
    from cai_ray.cli import _load, build_parser
    from cai_ray.config import ConfigError, load_config
    from cai_ray.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="guard: classifier needs classifier.path"):
        load_config(ServeConfig, None, ["guard=classifier"])
    with pytest.raises(ConfigError, match="guard: one of none, classifier"):
        load_config(ServeConfig, None, ["guard=always"])
    with pytest.raises(ConfigError, match="classifier.output_threshold: a probability"):
        load_config(ServeConfig, None, ["classifier.output_threshold=1.5"])
    with pytest.raises(ConfigError, match="classifier.every_tokens"):
        load_config(ServeConfig, None, ["classifier.every_tokens=0"])
    args = build_parser().parse_args(["serve", "--guard", "classifier", "--classifiers", str(tmp_path)])
    cfg = _load(ServeConfig, args, "")
    assert cfg.guard == "classifier" and cfg.classifier.path == str(tmp_path) and cfg.classifier.every_tokens == 16
    assert cfg.classifier.input_threshold is None and cfg.guardrail is False
