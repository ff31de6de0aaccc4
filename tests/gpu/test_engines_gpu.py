"""GPU checks, run on a machine with CUDA (skipped elsewhere, with the reason printed).

- the hf engine on CUDA: batched greedy == one-by-one greedy, choice_logprobs normalised
- the hf engine in bfloat16 on CUDA: generation runs, choice log-probs finite, normalised, near float32
"""

import math

import pytest

from cai_ray.engine import Sampling, load_engine

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "How do I reverse a list in Python?"}],
    [{"role": "user", "content": "Say hello in Spanish."}],
]
GREEDY = Sampling(temperature=0, max_new_tokens=24, seed=0)
MODEL = "tiny-random"


def test_hf_engine_on_cuda_batches_consistently():
    e = load_engine("hf", model=MODEL, dtype="float32", device="cuda")
    assert e.device.type == "cuda"
    assert e.generate(PROMPTS, GREEDY) == [e.generate([p], GREEDY)[0] for p in PROMPTS]
    rows = e.choice_logprobs([p + [{"role": "assistant", "content": "The answer is: ("}] for p in PROMPTS], ["A", "B"])
    assert all(math.isclose(sum(math.exp(x) for x in r), 1, rel_tol=1e-5) for r in rows)


def test_hf_engine_in_bfloat16_on_cuda_gives_finite_normalised_results():
    """bf16 on CUDA, the dtype of every GPU config: greedy and sampled generation run (sampling
    from bf16 logits: no inf or NaN probabilities), every choice row is scored, finite and
    normalised, and its probabilities are float32's to 0.05 (0.006 measured on CPU). The CPU
    twins: tests/unit/test_engine_hf.py::test_bfloat16_runs and
    ::test_choice_logprobs_normalise_and_do_not_depend_on_batching."""
    import torch

    e = load_engine("hf", model=MODEL, dtype="bfloat16", device="cuda")
    assert e.device.type == "cuda" and e.model.dtype == torch.bfloat16
    greedy = e.generate(PROMPTS, GREEDY)
    assert len(greedy) == len(PROMPTS) and any(greedy)
    sampled = e.generate(PROMPTS, Sampling(temperature=1.0, top_p=0.95, max_new_tokens=24, seed=0))
    assert len(sampled) == len(PROMPTS) and all(isinstance(t, str) for t in sampled)
    convs = [p + [{"role": "assistant", "content": "The answer is: ("}] for p in PROMPTS]
    rows = e.choice_logprobs(convs, ["A", "B"])
    for row in rows:
        assert isinstance(row, list) and len(row) == 2, row  # not Unscored
        assert all(math.isfinite(x) and x <= 0 for x in row)
        assert math.isclose(sum(math.exp(x) for x in row), 1, rel_tol=1e-5)
    want = load_engine("hf", model=MODEL, dtype="float32", device="cuda").choice_logprobs(convs, ["A", "B"])
    for got, ref in zip(rows, want):
        assert [math.exp(x) for x in got] == pytest.approx([math.exp(x) for x in ref], abs=0.05)
