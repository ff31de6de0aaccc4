"""GPU checks, run on a machine with CUDA (skipped elsewhere, with the reason printed).

- the hf engine on CUDA: batched greedy == one-by-one greedy, choice_logprobs normalised
- vllm vs hf: greedy outputs agree on a few prompts (needs vLLM installed)
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


def test_vllm_and_hf_agree_on_greedy_outputs():
    pytest.importorskip("vllm", reason="vLLM is not installed on this GPU machine")
    v = load_engine("vllm", model=MODEL, dtype="float32", gpu_memory_utilization=0.3)
    h = load_engine("hf", model=MODEL, dtype="float32", device="cuda")
    vo, ho = v.generate(PROMPTS, GREEDY), h.generate(PROMPTS, GREEDY)
    assert sum(a == b for a, b in zip(vo, ho)) >= len(PROMPTS) - 1
    convs = [p + [{"role": "assistant", "content": "The answer is: ("}] for p in PROMPTS]
    for a, b in zip(v.choice_logprobs(convs, ["A", "B"]), h.choice_logprobs(convs, ["A", "B"])):
        assert a == pytest.approx(b, abs=2e-2)
