"""GPU checks, run on a machine with CUDA (skipped elsewhere, with the reason printed).

- the hf engine on CUDA: batched greedy == one-by-one greedy, choice_logprobs normalised
"""

import math

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
