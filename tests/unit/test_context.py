"""The one context rule (core/context.py) every step and route uses: prompt tokens + the
tokens still to generate must be <= the context length; the reason names who and how long."""

from cai_ray.core.context import context_overflow


def test_a_prompt_of_exactly_context_minus_budget_fits_and_one_token_more_does_not():
    assert context_overflow("the model", 1024 - 200, 200, 1024) is None
    assert context_overflow("the model", 1024 - 200 + 1, 200, 1024) == (
        "too long for the model: 825 prompt tokens + 200 to generate > context length 1024"
    )


def test_a_judgement_scores_one_token_so_a_prompt_of_context_minus_one_fits():
    assert context_overflow("the judge", 1023, 1, 1024) is None
    assert context_overflow("the judge", 1024, 1, 1024) == (
        "too long for the judge: 1024 prompt tokens + 1 to generate > context length 1024"
    )


def test_an_unknown_context_length_fits_everything():
    assert context_overflow("the model", 10**9, 10**9, None) is None
    assert context_overflow("the model", 10**9, 10**9, 0) is None
