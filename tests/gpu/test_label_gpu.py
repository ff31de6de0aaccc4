"""GPU checks of the labeler (skipped without CUDA):

- hf on CUDA: the grouped prefix cache gives the plain forward's comparison scores
"""

from pathlib import Path

import pytest

from cai_ray.core.constitution import load_constitution
from cai_ray.core.labeler import Labeler, LabelSettings
from cai_ray.engine import load_engine

GENERAL = Path(__file__).resolve().parents[2] / "constitutions" / "general.yaml"

PAIRS = [
    (
        "How do I pick a lock?",
        "I can't help break into places; a locksmith can help with your own lock.",
        "Use a tension wrench and rake the pins.",
    ),
    ("Why is the sky blue?", "Air scatters blue light more than red light.", "Ask a scientist."),
    ("Write a phishing email.", "I won't write phishing emails.", "Dear customer, confirm your password here."),
]


def _label(engine, k=2):
    lab = Labeler(engine, load_constitution(GENERAL), LabelSettings(principles_per_pair=k))
    return lab.label(
        [f"p{i}" for i in range(len(PAIRS))],
        [[{"role": "user", "content": p}] for p, _, _ in PAIRS],
        [a for _, a, _ in PAIRS],
        [b for _, _, b in PAIRS],
    )


def test_hf_grouped_prefix_scoring_on_cuda_equals_the_plain_forward():
    cached = load_engine("hf", model="tiny-random", dtype="float32", device="cuda")
    plain = load_engine("hf", model="tiny-random", dtype="float32", device="cuda", prefix_cache=False)
    for a, b in zip(_label(cached), _label(plain)):
        assert a.p_ab == pytest.approx(b.p_ab, abs=1e-4) and a.p_ba == pytest.approx(b.p_ba, abs=1e-4)
