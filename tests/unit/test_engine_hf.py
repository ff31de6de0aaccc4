import math

import pytest

from cai_ray.engine import EngineUnavailable, Sampling, engine_class, load_engine, normalise_logprobs

CONVS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about a dragon who lived in a cave by the sea."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name three colours of the rainbow, please."}],
]
GREEDY = Sampling(temperature=0, max_new_tokens=12, seed=0)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine("hf", model="tiny-random", dtype="float32", threads=2, max_batch_size=8)


def test_batching_and_padding_do_not_change_greedy_outputs(engine):
    one_by_one = [engine.generate([c], GREEDY)[0] for c in CONVS]
    batched = engine.generate(CONVS, GREEDY)
    assert batched == one_by_one
    engine.max_batch_size = 3  # uneven micro-batches
    try:
        assert engine.generate(CONVS[::-1], GREEDY) == one_by_one[::-1]
    finally:
        engine.max_batch_size = 8
    assert any(batched)  # the model did generate something


def test_sampling_is_seeded(engine):
    p = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
    assert engine.generate(CONVS, p) == engine.generate(CONVS, p)
    assert engine.generate(CONVS, p) != engine.generate(CONVS, Sampling(temperature=1.0, max_new_tokens=12, seed=4))


def test_a_vanishing_temperature_is_greedy_not_an_overflow(engine):
    """temperature 4e-132 (found by fuzzing the server) divided the logits into inf."""
    conv = [[{"role": "user", "content": "Tell me a story"}]]
    tiny = Sampling(temperature=4e-132, max_new_tokens=12, seed=0)
    assert tiny.greedy and not Sampling(temperature=0.01).greedy
    assert engine.generate(conv, tiny) == engine.generate(conv, GREEDY)


def test_choice_logprobs_normalise_and_do_not_depend_on_batching(engine):
    convs = [c + [{"role": "assistant", "content": "The answer is: ("}] for c in CONVS]
    rows = engine.choice_logprobs(convs, ["A", "B"])
    for row in rows:
        assert len(row) == 2
        assert math.isclose(sum(math.exp(x) for x in row), 1.0, rel_tol=1e-6)
    single = [engine.choice_logprobs([c], ["A", "B"])[0] for c in convs]
    for a, b in zip(rows, single):
        assert a == pytest.approx(b, abs=1e-4)
    assert len({round(r[0], 5) for r in rows}) > 1  # depends on the conversation


def test_token_counts_and_context(engine):
    n = engine.token_counts(CONVS)
    assert all(x > 0 for x in n) and n[1] > n[0]
    assert engine.context_length == 1024


def test_bfloat16_runs(tiny_model):
    e = load_engine("hf", model="tiny-random", dtype="bfloat16", threads=1)
    assert len(e.generate(CONVS[:2], GREEDY)) == 2


def test_normalise_logprobs():
    row = normalise_logprobs([math.log(3), math.log(1)])
    assert [math.exp(x) for x in row] == pytest.approx([0.75, 0.25])


def test_unknown_backend_and_missing_vllm():
    with pytest.raises(ValueError, match="unknown engine backend"):
        engine_class("tpu")
    try:
        import vllm  # noqa: F401
    except ImportError:  # pragma: no cover - make setup installs vLLM (its CPU build here)
        with pytest.raises(EngineUnavailable, match=r"pip install 'cai-ray\[vllm\]'"):
            load_engine("vllm", model="tiny-random")


def test_unknown_model_is_a_clear_error():
    from cai_ray.models import ModelNotFound, resolve_model

    with pytest.raises(ModelNotFound, match="unknown model 'nonsense'"):
        resolve_model("nonsense")


def test_shared_prefix_cache_gives_the_same_outputs(tiny_model, general_constitution):
    """Critique prompts share their few-shot turns: prefilling them once must not change
    a single greedy token, with or without sampling noise in the rows' lengths."""
    from cai_ray.core import prompts

    shots = prompts.few_shot_turns(general_constitution, None)
    p = general_constitution.principle("privacy")
    user_only = [CONVS[0], CONVS[1], CONVS[3]]  # a system message would come before the shots
    convs = [prompts.critique_messages(shots, c, f"answer {i} " * (i + 1), p) for i, c in enumerate(user_only)]
    cached = load_engine("hf", model="tiny-random", dtype="float32", threads=2, prefix_cache=True)
    plain = load_engine("hf", model="tiny-random", dtype="float32", threads=2, prefix_cache=False)
    from cai_ray.engine.hf import MIN_SHARED_PREFIX, _common_prefix

    assert _common_prefix([cached._encode(c) for c in convs]) >= MIN_SHARED_PREFIX
    p16 = Sampling(temperature=0, max_new_tokens=16, seed=0)
    assert cached.generate(convs, p16) == plain.generate(convs, p16)
    sampled = Sampling(temperature=0.8, max_new_tokens=16, seed=5)
    assert len(cached.generate(convs, sampled)) == len(convs)


def test_common_prefix_leaves_a_token_per_row():
    from cai_ray.engine.hf import _common_prefix

    assert _common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert _common_prefix([[9], [1]]) == 0


def test_choice_logprobs_match_an_unpadded_reference(engine):
    """Scores from the batched, left-padded, last-positions-only path equal a plain
    one-sequence forward pass, for single- and multi-token choices."""
    import torch

    convs = [c + [{"role": "assistant", "content": "The answer is: ("}] for c in CONVS]
    choices = ["A", "B)"]
    got = engine.choice_logprobs(convs, choices)
    for conv, row in zip(convs, got):
        prefix = engine._encode(conv)
        ref = []
        for choice in choices:
            ids = engine.tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logp = torch.log_softmax(engine.model(torch.tensor([prefix + ids])).logits.float(), -1)[0]
            ref.append(sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(ids)))
        assert row == pytest.approx(normalise_logprobs(ref), abs=1e-4)


def test_tiny_random_is_built_deterministically_by_seed(tiny_model, tmp_path, monkeypatch):
    from pathlib import Path

    from cai_ray.models import resolve_model

    monkeypatch.setenv("CAI_RAY_CACHE", str(tmp_path))
    rebuilt = resolve_model("tiny-random")
    other = resolve_model("tiny-random:1")
    weights = lambda d: (Path(d) / "model.safetensors").read_bytes()  # noqa: E731
    assert rebuilt != tiny_model and weights(rebuilt) == weights(tiny_model)
    assert weights(other) != weights(tiny_model)


def test_choice_logprobs_with_a_shared_prefix_equal_the_plain_forward(tiny_model):
    """The labeler's few-shot header is prefilled once and reused (also across calls);
    the scores must be those of the full, unshared forward."""
    header = [
        {"role": "user", "content": "Example question " * 30},
        {"role": "assistant", "content": "The answer is: (B)"},
    ]
    convs = [header + c + [{"role": "assistant", "content": "The answer is: ("}] for c in CONVS]
    shared = load_engine("hf", model="tiny-random", dtype="float32", threads=2, max_batch_size=8)
    plain = load_engine("hf", model="tiny-random", dtype="float32", threads=2, max_batch_size=8, prefix_cache=False)
    want = plain.choice_logprobs(convs, ["A", "B"])
    first = shared.choice_logprobs(convs, ["A", "B"])
    again = shared.choice_logprobs(convs[::-1], ["A", "B"])[::-1]  # from the kept prefix cache
    assert len(shared._prefix_caches) == 1
    for w, a, b in zip(want, first, again):
        assert a == pytest.approx(w, abs=1e-4)
        assert b == pytest.approx(w, abs=1e-4)
    # groups sharing more than the header (the two orders of one comparison): computed
    # once per group, and still the scores of the full forward
    grouped = [
        header
        + [{"role": "user", "content": f"Group {g}: " + "shared words here " * (4 + g) + tail}]
        + [{"role": "assistant", "content": "The answer is: ("}]
        for g in range(3)
        for tail in ("one", "a longer tail of text", "x")
    ]
    plan = list(shared._plan_batches([shared._encode(c) for c in grouped]))
    assert any(p >= 16 and len(m) > 1 for _, _, groups in plan for p, m in groups)
    want = plain.choice_logprobs(grouped, ["A", "B"])
    got = shared.choice_logprobs(grouped, ["A", "B"])
    for w, g in zip(want, got):
        assert g == pytest.approx(w, abs=1e-4)
    # multi-token choices take the per-choice path and agree with it too
    choices = ["A) yes", "B) no"]
    assert min(len(shared.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices) > 1
    multi = shared.choice_logprobs(convs[:2], choices)
    for m, w in zip(multi, plain.choice_logprobs(convs[:2], choices)):
        assert m == pytest.approx(w, abs=1e-4)


@pytest.fixture(scope="module")
def sentencepiece_engine(tmp_path_factory):
    """A tiny Llama with a SentencePiece-style tokenizer that also merges "(" with "C"."""
    from support.sentencepiece_model import build

    path = build(tmp_path_factory.mktemp("sp-llama"), merged=("▁(C",))
    return load_engine("hf", model=path, dtype="float32", threads=2)


def _own_continuation(tokenizer, conv, choice):
    """(prompt ids, ids of prompt text + choice): what the tokenizer itself makes of them."""
    text = tokenizer.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ids(text), ids(text + choice)


def test_choices_are_scored_as_the_tokenizer_continues_the_prompt(sentencepiece_engine):
    """SentencePiece makes "A" alone ``▁A``; after "The answer is: (" the model writes a bare
    ``A``. The labeler's scores are those of the bare tokens (a plain forward's log-softmax
    at them), not of ``▁A`` / ``▁B``."""
    import torch

    from cai_ray.core import prompts

    e = sentencepiece_engine
    convs = [c + [prompts.assistant(prompts.ANSWER_PREFIX)] for c in CONVS[:3]]
    got = e.choice_logprobs(convs, prompts.CHOICES)
    alone = [e.tokenizer(c, add_special_tokens=False)["input_ids"] for c in prompts.CHOICES]
    for conv, row in zip(convs, got):
        own = []
        for choice in prompts.CHOICES:
            prompt, full = _own_continuation(e.tokenizer, conv, choice)
            assert full[: len(prompt)] == prompt and len(full) == len(prompt) + 1
            own.append(full[-1])
        assert [[t] for t in own] != alone  # the case this test is about
        with torch.inference_mode():
            logp = torch.log_softmax(e.model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        assert row == pytest.approx(normalise_logprobs([float(logp[t]) for t in own]), abs=1e-5)
        assert row != pytest.approx(normalise_logprobs([float(logp[t]) for [t] in alone]), abs=1e-3)
        assert e.choice_continuations(conv, prompts.CHOICES) == (prompt, [[t] for t in own])


def test_a_choice_merged_with_the_prompts_end_is_scored_from_the_shared_context(sentencepiece_engine):
    """This tokenizer makes "(" + "C" one token (``▁(C``) but "(" + "D" two: both choices
    are scored after the ids they share (the prompt without its last token), as
    P(▁(C) vs P(▁() · P(D | ▁(): the probabilities of the two texts."""
    import torch

    from cai_ray.core import prompts

    e = sentencepiece_engine
    conv = CONVS[0] + [prompts.assistant(prompts.ANSWER_PREFIX)]
    prompt, with_c = _own_continuation(e.tokenizer, conv, "C")
    _, with_d = _own_continuation(e.tokenizer, conv, "D")
    context = prompt[:-1]
    assert with_c[:-1] == with_d[:-2] == context and with_d[:-1] == prompt
    assert e.tokenizer.convert_ids_to_tokens(with_c[-1:] + with_d[-2:]) == ["▁(C", "▁(", "D"]
    with torch.inference_mode():
        logp = torch.log_softmax(e.model(torch.tensor([with_d])).logits[0].float(), -1)
    n = len(context)
    want = [float(logp[n - 1, with_c[-1]]), float(logp[n - 1, with_d[-2]] + logp[n, with_d[-1]])]
    assert e.choice_logprobs([conv], ("C", "D"))[0] == pytest.approx(normalise_logprobs(want), abs=1e-5)
    assert e.choice_continuations(conv, ("C", "D")) == (context, [with_c[-1:], with_d[-2:]])
