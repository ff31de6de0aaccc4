"""Label arithmetic on hand-computed values (groundwork for the RLAIF labeling stage)."""

import math

import pytest

from cai_ray.core.label_math import (
    clamp,
    debias,
    ensemble,
    expected_calibration_error,
    from_swapped,
    parse_choice,
    soft_label,
)


def test_soft_label_normalises_over_two_options():
    assert soft_label(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert soft_label(-1000.0, -1000.0) == pytest.approx(0.5)  # no underflow
    assert soft_label(0.0, -math.inf) == 1.0


def test_debias_averages_orders_and_flags_position_bias():
    # order AB: P(A)=0.8 → response_a 0.8; order BA: P(A)=0.3 → response_a is (B): 0.7
    p, ok = debias(0.8, from_swapped(0.3))
    assert p == pytest.approx(0.75) and ok
    # a labeler that always picks the first option
    p, ok = debias(0.9, from_swapped(0.9))
    assert p == pytest.approx(0.5) and not ok


def test_ensemble_and_clamp():
    assert ensemble([0.9, 0.6, 0.3]) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        ensemble([])
    assert clamp(0.97) == 0.6 and clamp(0.02) == 0.4 and clamp(0.55) == 0.55
    assert clamp(0.97, 0.3, 0.9) == 0.9
    with pytest.raises(ValueError):
        clamp(0.5, 0.6, 0.7)


@pytest.mark.parametrize(
    "text, choice",
    [
        ("Response A helps the attacker. The answer is: (B)", "B"),
        ("The answer is (A).", "A"),
        ("(A) is more harmful, so I pick (B).", None),  # both named, no final answer
        ("Both are fine.", None),
        ("", None),
        ("The answer is: (A) ... on reflection the answer is: (B)", None),
        ("I choose option B", "B"),
    ],
)
def test_parse_choice_never_guesses(text, choice):
    got, reason = parse_choice(text)
    assert got == choice
    assert (reason is None) == (choice is not None)


def test_expected_calibration_error():
    # perfectly calibrated: 0.8-confidence bin right 80% of the time
    assert expected_calibration_error([0.8] * 5, [1, 1, 1, 1, 0]) == pytest.approx(0.0)
    # always 0.9 confident, right half the time: ECE 0.4
    assert expected_calibration_error([0.9] * 4, [1, 0, 1, 0]) == pytest.approx(0.4)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == pytest.approx(0.0)


def test_non_finite_numbers_never_become_labels():
    """NaN / +inf log-probs are Unscored (the comparison is invalid, with the reason), a NaN
    p_a is filtered rather than passing min_margin, and σ has no overflow."""
    from cai_ray.core.label_math import sigmoid
    from cai_ray.engine import Unscored, normalise_logprobs
    from cai_ray.label.run import PairLabel, filter_reason

    for row in ([float("nan"), -1.0], [float("inf"), -1.0], [float("-inf"), float("-inf")]):
        out = normalise_logprobs(row)
        assert isinstance(out, Unscored) and out.reason, row
    assert normalise_logprobs([0.0, float("-inf")]) == [0.0, float("-inf")]  # a choice at 0 is fine
    nan = PairLabel(float("nan"), 0.5, 0.5, True, ["p"], None, None, None, None)
    assert "non-finite" in filter_reason(nan, 0.1, False)
    assert sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0 and sigmoid(0.0) == 0.5
    assert abs(sigmoid(-710.0)) < 1e-300
