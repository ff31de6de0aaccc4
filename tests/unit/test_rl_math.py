"""The RL arithmetic on hand-computed values (issue 7): GAE, the clipped objectives at and
beyond their bounds, KL estimators, rewards, whitening, RLOO/GRPO baselines, adaptive β."""

import math

import pytest
import torch

from cai_ray.core import rl_math as m

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def test_gae_on_a_three_step_example():
    # γ=1, λ=0.95: δ2 = 1-0.7 = 0.3; δ1 = 0+0.7-0.6 = 0.1; δ0 = 0+0.6-0.5 = 0.1
    # A2 = 0.3, A1 = 0.1+0.95·0.3 = 0.385, A0 = 0.1+0.95·0.385 = 0.46575
    adv, ret = m.gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.95)
    assert close(adv, [[0.46575, 0.385, 0.3]])
    assert close(ret, [[0.96575, 0.985, 1.0]])


def test_gae_with_discount_and_lambda_one_is_the_discounted_return_minus_value():
    adv, ret = m.gae(T([[1.0, 2.0, 3.0]]), T([[0.0, 0.0, 0.0]]), T([[1.0, 1.0, 1.0]]), gamma=0.5, lam=1.0)
    assert close(ret, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]])
    assert close(adv, ret)


def test_gae_stops_at_the_eos_and_ignores_padding():
    # row 2 ends after two tokens: the value at the padded position (9.0) must not leak in
    rewards = T([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = T([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = m.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 2: δ1 = 1 - 0.6 = 0.4 (no bootstrap past the EOS); δ0 = 0.6 - 0.5 = 0.1; A0 = 0.1 + 0.95·0.4
    assert close(adv[1], [0.48, 0.4, 0.0])
    assert close(ret[1], [0.98, 1.0, 0.0])
    assert close(adv[0], [0.46575, 0.385, 0.3])  # rows are independent


@pytest.mark.parametrize(
    "adv, ratio, expected_loss, clipped",
    [
        (1.0, 1.0, -1.0, 0.0),  # on-policy: the plain surrogate
        (1.0, 1.2, -1.2, 0.0),  # exactly at the upper bound: both terms equal, not counted as clipped
        (1.0, 1.5, -1.2, 1.0),  # beyond it with a positive advantage: capped at 1+ε
        (1.0, 0.5, -0.5, 0.0),  # below 1-ε with a positive advantage: the pessimistic (unclipped) term
        (-1.0, 0.5, 0.8, 1.0),  # below 1-ε with a negative advantage: capped at 1-ε
        (-1.0, 1.5, 1.5, 0.0),  # above 1+ε with a negative advantage: unclipped, no cap on the penalty
    ],
)
def test_clipped_policy_objective_at_and_beyond_the_bounds(adv, ratio, expected_loss, clipped):
    old = T([[0.0]])
    logp = torch.log(T([[ratio]])).requires_grad_()
    loss, stats = m.policy_loss(logp, old, T([[adv]]), T([[1.0]]), clip=0.2)
    assert math.isclose(loss.item(), expected_loss, abs_tol=1e-6)
    assert stats["clipfrac"].item() == clipped
    loss.backward()
    # where the clip is active the gradient vanishes; elsewhere it is -A·ρ
    assert math.isclose(logp.grad.item(), 0.0 if clipped else -adv * ratio, abs_tol=1e-6)


def test_policy_loss_averages_over_real_tokens_only():
    logp = T([[0.0, 0.0, 5.0]])  # the padded position has a huge ratio: it must not count
    loss, stats = m.policy_loss(logp, T([[0.0, 0.0, 0.0]]), T([[1.0, 3.0, 100.0]]), T([[1.0, 1.0, 0.0]]))
    assert math.isclose(loss.item(), -2.0, abs_tol=1e-6)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_value_loss_is_clipped_around_the_rollout_values():
    # V=1.0, V_old=0.5, R=1.2, ε=0.2: clipped V = 0.7; max(0.04, 0.25)/2 = 0.125
    loss, stats = m.value_loss(T([[1.0]]), T([[0.5]]), T([[1.2]]), T([[1.0]]), clip=0.2)
    assert math.isclose(loss.item(), 0.125, abs_tol=1e-6) and stats["vf_clipfrac"].item() == 1.0
    # inside the clip range the plain squared error: (0.6 - 1.2)²/2 = 0.18
    loss, stats = m.value_loss(T([[0.6]]), T([[0.5]]), T([[1.2]]), T([[1.0]]), clip=0.2)
    assert math.isclose(loss.item(), 0.18, abs_tol=1e-6) and stats["vf_clipfrac"].item() == 0.0


def test_kl_estimators():
    logp, ref = T([[-1.0]]), T([[-1.5]])  # r = 0.5
    assert close(m.kl_per_token(logp, ref, "k1"), [[0.5]])
    assert close(m.kl_per_token(logp, ref, "k2"), [[0.125]])
    assert close(m.kl_per_token(logp, ref, "k3"), [[math.exp(-0.5) - 1 + 0.5]])
    # k3 is never negative; k1 is when the policy is less likely than the reference
    assert m.kl_per_token(ref, logp, "k1").item() == -0.5 and m.kl_per_token(ref, logp, "k3").item() > 0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        m.kl_per_token(logp, ref, "k4")


def test_kl_estimators_are_unbiased_on_samples():
    """E_{x~p}[k1] = E[k3] = KL(p‖q) for two categoricals, within sampling error."""
    p, q = T([0.7, 0.2, 0.1]), T([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    lp, lq = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        assert abs(m.kl_per_token(lp, lq, kind).mean().item() - exact) < 0.01, kind


def test_token_rewards_put_the_score_on_the_last_real_token():
    rewards = m.token_rewards(
        T([2.0, -1.0]), T([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]]), 0.5, T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    )
    assert close(rewards, [[-0.05, -0.1 + 2.0, 0.0], [-0.2 - 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="no tokens"):
        m.token_rewards(T([1.0]), T([[0.0, 0.0]]), 0.1, T([[0.0, 0.0]]))


def test_entropy_from_logits():
    assert close(m.entropy_from_logits(T([[0.0, 0.0, 0.0, 0.0]])), [math.log(4)])
    assert m.entropy_from_logits(T([[100.0, 0.0]])).item() < 1e-6


def test_adaptive_kl_moves_beta_toward_the_target():
    ctl = m.AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert math.isclose(ctl.update(12.0, 256), 0.1 * (1 + 0.2 * 256 / 10000))  # error clipped to +0.2
    before = ctl.value
    assert math.isclose(ctl.update(5.4, 100), before * (1 - 0.1 * 100 / 10000))  # below target: β shrinks
    fixed = m.AdaptiveKL(0.05)
    assert fixed.update(100.0, 1000) == 0.05
    restored = m.AdaptiveKL(0.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value and restored.target == 6.0


def test_behaviour_weights_are_truncated_ratios_without_gradient():
    """w = min(π_old/π_behaviour, cap) per real token: ratios e^0.5, e^-0.5, e^2 (capped at 2)."""
    old = T([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    behaviour = T([[-0.5, 0.5, -2.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    w, st = m.behaviour_weights(old, behaviour, mask, cap=2.0)
    assert close(w, [[math.exp(0.5), math.exp(-0.5), 2.0, 0.0]]) and not w.requires_grad
    assert close(st["is_truncated"], 1 / 3)
    assert close(st["behaviour_kl"], (-0.5 + 0.5 - 2.0) / 3)


def test_importance_weights_scale_each_tokens_clipped_term():
    """With weights, each token's clipped term is multiplied by its weight; weights of 1 change nothing."""
    logp, old = T([[0.1, -0.1]]), T([[0.0, 0.0]])
    adv, mask = T([[1.0, -1.0]]), T([[1.0, 1.0]])
    plain, _ = m.policy_loss(logp, old, adv, mask, 0.2)
    ones, _ = m.policy_loss(logp, old, adv, mask, 0.2, weights=T([[1.0, 1.0]]))
    half, _ = m.policy_loss(logp, old, adv, mask, 0.2, weights=T([[0.5, 2.0]]))
    r = math.exp(0.1), math.exp(-0.1)
    assert close(plain, ones)
    assert close(half, (-1.0 * r[0] * 0.5 + 1.0 * r[1] * 2.0) / 2)


def test_group_baselines_of_grpo_and_rloo_on_hand_computed_groups():
    """Two groups of three answers. RLOO: r - mean of the other two; GRPO: (r - mean)/std (n-1).
    A group whose answers scored alike has advantage 0 (no signal, no division by 0)."""
    scores = T([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    assert close(m.group_advantages(scores, 3, "rloo"), [1 - 4, 2 - 3.5, 6 - 1.5, 0, 0, 0])
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert close(m.group_advantages(scores, 3, "grpo"), [-2 / std, -1 / std, 3 / std, 0, 0, 0], tol=1e-5)
    # the groups are consecutive: the same scores in groups of two give other baselines
    assert close(m.group_advantages(scores, 2, "rloo"), [-1, 1, 2, -2, 0, 0])
    for bad, match in ((dict(group_size=4), "groups of 4"), (dict(group_size=1), "at least 2")):
        with pytest.raises(ValueError, match=match):
            m.group_advantages(scores, kind="grpo", **bad)
    with pytest.raises(ValueError, match="grpo or rloo"):
        m.group_advantages(scores, 3, "ppo")
