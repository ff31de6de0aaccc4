"""The vllm engine on this machine (vLLM's CPU build): the same answers and choice
probabilities as the hf engine on the same model, per-request seeds, one forward per
single-token choice. One engine for the whole module (~25 s to start); the
SentencePiece-tokenizer test and the script-on-stdin test start one of their own."""

import asyncio
import math

import pytest

from cai_ray.core import prompts
from cai_ray.engine import Sampling, Unscored, load_engine, normalise_logprobs

pytestmark = pytest.mark.slow

MODEL = "tiny-random-wide"  # head_dim 64: vLLM's CPU attention rejects tiny-random's 16
GREEDY = Sampling(temperature=0.0, max_new_tokens=24)
# Same weights, same float32 arithmetic, different kernels: choice probabilities agree to
# float32 rounding (measured |diff| < 1e-6); the bound leaves room for other CPUs' kernels.
PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vllm_engine():
    engine = load_engine("vllm", model=MODEL, dtype="float32", threads=2)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_engine():
    return load_engine("hf", model=MODEL, dtype="float32", threads=2)


def _convs(n=6):
    return [[prompts.user(f"Tell me about item {i}. " * (i + 1))] for i in range(n)]


def _labeler_convs():
    return [c + [prompts.assistant(prompts.ANSWER_PREFIX)] for c in _convs()]


def test_hf_and_vllm_give_the_same_greedy_text(vllm_engine, hf_engine):
    convs = _convs()
    assert vllm_engine.generate(convs, GREEDY) == hf_engine.generate(convs, GREEDY)
    assert vllm_engine.token_counts(convs) == hf_engine.token_counts(convs)
    assert vllm_engine.context_length == hf_engine.context_length == 1024


@pytest.mark.parametrize("choices", [prompts.CHOICES, (" yes please", " no thanks, not that")])
def test_hf_and_vllm_give_the_same_choice_probabilities(vllm_engine, hf_engine, choices):
    v = vllm_engine.choice_logprobs(_labeler_convs(), choices)
    h = hf_engine.choice_logprobs(_labeler_convs(), choices)
    for rv, rh in zip(v, h):
        assert not isinstance(rv, Unscored)
        assert sum(math.exp(x) for x in rv) == pytest.approx(1.0)
        assert [math.exp(x) for x in rv] == pytest.approx([math.exp(x) for x in rh], abs=PROB_TOLERANCE)


def test_single_token_choices_take_one_request_per_conversation(vllm_engine, monkeypatch):
    calls = []
    real = vllm_engine._final

    async def counting(token_ids, sp):
        calls.append(sp)
        return await real(token_ids, sp)

    monkeypatch.setattr(vllm_engine, "_final", counting)
    convs = _labeler_convs()
    vllm_engine.choice_logprobs(convs, prompts.CHOICES)
    assert len(calls) == len(convs)
    assert all(sp.allowed_token_ids and sp.max_tokens == 1 and not sp.prompt_logprobs for sp in calls)
    calls.clear()
    vllm_engine.choice_logprobs(convs, (" yes please", " no thanks"))  # several tokens: exact path
    assert len(calls) == 2 * len(convs) and all(sp.prompt_logprobs == 0 for sp in calls)


def test_bad_choices_are_clear_errors(vllm_engine):
    with pytest.raises(ValueError, match="at least two"):
        vllm_engine.choice_logprobs(_labeler_convs(), ["A"])
    with pytest.raises(ValueError, match="tokenize the same"):
        vllm_engine.choice_logprobs(_labeler_convs(), ["A", "A"])


def test_seeds_are_per_request(vllm_engine):
    """A sampled answer depends on its own seed only: not on the other requests running,
    nor on its position in the call."""
    convs = _convs(4)
    params = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=11)
    batch = vllm_engine.generate(convs, params)
    assert vllm_engine.generate(convs, params) == batch
    alone = vllm_engine.generate([convs[2]], Sampling(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=13))
    assert alone == [batch[2]]  # request i of a call is seeded seed + i
    other = vllm_engine.generate(convs, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=12))
    assert other != batch
    # the per-request coroutine takes its seed explicitly (what the SL chains use)
    one = vllm_engine.run(vllm_engine.agenerate(convs[0], params, seed=11))
    assert one == batch[0]


def test_streaming_yields_the_same_text_in_pieces(vllm_engine):
    async def collect():
        return [piece async for piece in vllm_engine.astream(_convs(1)[0], GREEDY)]

    pieces = vllm_engine.run(collect())
    assert len(pieces) > 1
    assert "".join(pieces).strip() == vllm_engine.generate(_convs(1), GREEDY)[0]


def test_engine_settings_reach_vllm(vllm_engine):
    cfg = vllm_engine.llm.vllm_config
    assert cfg.cache_config.enable_prefix_caching is True
    assert cfg.model_config.enforce_eager is True
    assert cfg.model_config.logprobs_mode == "processed_logprobs"
    assert cfg.scheduler_config.enable_chunked_prefill is False  # CPU: see the next test


def test_seeded_sampling_with_prompts_over_a_step_budget(vllm_engine):
    """Eight ~600-token prompts, sampled with per-request seeds: more prompt tokens than
    vLLM's default step budget (2048), so with chunked prefill a seeded request's prefill is
    split over steps — and vLLM's CPU build then kills its engine core ("CPU Generator does
    not use offset"). Whole prefills on CPU: the answers come, the same for the same seeds."""
    long = [[prompts.user(f"Item {i}: " + "tell me more about safety. " * 100)] for i in range(8)]
    assert min(vllm_engine.token_counts(long)) > 500
    params = Sampling(temperature=1.0, max_new_tokens=4, seed=5)
    first = vllm_engine.generate(long, params)
    assert len(first) == 8 and vllm_engine.generate(long, params) == first


def test_engine_coroutines_run_from_another_event_loop(vllm_engine):
    """A Serve replica awaits the engine from its own loop (on_engine bridges the two)."""

    async def replica():
        return await asyncio.gather(*(vllm_engine.on_engine(vllm_engine.agenerate(c, GREEDY)) for c in _convs(3)))

    assert asyncio.run(replica()) == vllm_engine.generate(_convs(3), GREEDY)


def test_sentencepiece_choices_are_scored_alike_on_hf_and_vllm(tmp_path, general_constitution):
    """SentencePiece (Llama-2, Mistral, Gemma) makes "A" alone ``▁A``, while the model
    continues "The answer is: (" with a bare ``A``. On labeler comparisons both backends
    score the bare tokens (the probabilities of a plain forward at the tokenizer's own
    continuation) and agree; so do "C" / "D", which this tokenizer merges with "(" unlike
    each other (``▁(C`` but ``▁(`` ``D``). Its own engine: a second ~30 s start."""
    import torch
    from support.sentencepiece_model import build

    path = build(tmp_path / "sp-llama", merged=("▁(C",))
    hf = load_engine("hf", model=path, dtype="float32", threads=2)
    ids = lambda text: hf.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    p0, p1 = general_constitution.principles[:2]
    kind, rude = "a kind answer", "a rude answer"
    convs = [
        prompts.comparison_messages([], [prompts.user(f"Tell me about item {i}.")], a, b, p)
        for i, (a, b, p) in enumerate([(kind, rude, p0), (kind, rude, p1), (rude, kind, p0)])
    ]
    want = []
    for conv in convs:
        text = hf.tokenizer.apply_chat_template(conv, tokenize=False, continue_final_message=True)
        prompt, *full = [ids(text + c) for c in ("", *prompts.CHOICES)]
        assert all(f[:-1] == prompt for f in full)
        own = [f[-1] for f in full]
        assert own != [t for c in prompts.CHOICES for t in ids(c)]  # the case: a choice alone is another token
        with torch.inference_mode():
            logp = torch.log_softmax(hf.model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        want.append([math.exp(x) for x in normalise_logprobs([float(logp[t]) for t in own])])
    vllm_engine = load_engine("vllm", model=path, dtype="float32", threads=2)
    try:
        for choices in (prompts.CHOICES, ("C", "D")):
            v = vllm_engine.choice_logprobs(convs, choices)
            h = hf.choice_logprobs(convs, choices)
            for rv, rh in zip(v, h):
                assert not isinstance(rv, Unscored)
                assert [math.exp(x) for x in rv] == pytest.approx([math.exp(x) for x in rh], abs=PROB_TOLERANCE)
            if choices == prompts.CHOICES:
                for rv, w in zip(v, want):
                    assert [math.exp(x) for x in rv] == pytest.approx(w, abs=PROB_TOLERANCE)
    finally:
        vllm_engine.shutdown()


STDIN_SCRIPT = """
import json, sys
import psutil
from cai_ray.engine import Sampling, load_engine

class Holder:  # as a stage's worker holds its engine
    def __init__(self):
        self.engine = load_engine("vllm", model=sys.argv[1], dtype="float32", threads=1)

holder = Holder()
answer = holder.engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(temperature=0, max_new_tokens=24))
engine = [p for p in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
del holder  # the engine goes with its holder, and its processes with it
alive = [p.pid for p in engine if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
print("RESULT", json.dumps({"answer": answer, "engine_processes": len(engine), "alive_after_del": alive}))
"""


def test_vllm_runs_from_a_script_on_stdin_and_stops_with_its_holder(hf_engine, tmp_path):
    """``python -`` (a script on stdin) names its main module "<stdin>": vLLM's spawned
    engine core re-ran that path and died (FileNotFoundError). Dropping the engine's holder
    stops its processes there and then, and the run logs no traceback (vLLM's shutdown
    reported its own engine core's exit as an EngineDeadError)."""
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-", MODEL], input=STDIN_SCRIPT, capture_output=True, text=True, cwd=tmp_path, timeout=400
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["answer"] == hf_engine.generate([[prompts.user("Hi")]], GREEDY)
    assert out["engine_processes"] >= 1 and out["alive_after_del"] == []
    for noise in ("Traceback", "EngineDeadError", "KeyError"):
        assert noise not in r.stderr + r.stdout, (r.stderr + r.stdout)[-3000:]
