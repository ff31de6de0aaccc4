"""The arithmetic of RL-CAI, as pure tensor functions (no models, no state but the KL controller).

Shapes: ``(batch, T)`` over the *response* tokens of a rollout. ``mask`` is 1 for the
response's real tokens (up to and including its EOS) and 0 for the padding after it, so
every function below ignores what comes after a sequence ended:

    per-token reward   r_t = -β·KL_t            (+ the sequence score at the last real token)
    GAE                δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t,   A_t = δ_t + γλ·m_{t+1}·A_{t+1}
    policy loss        max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)),  ρ = exp(logπ - logπ_old)
    value loss         ½·max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²)
    critic-free        one advantage per response from the k responses to its prompt:
                       GRPO (r - mean)/(std + ε), RLOO r - mean of the other k-1

References: Ziegler et al. 2019 (per-token KL penalty, adaptive β), Schulman et al. 2017
(PPO, GAE 2016), Schulman's note "Approximating KL divergence" (k1/k2/k3), Ahmadian et
al. 2024 (RLOO), Shao et al. 2024 (GRPO).
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1 (0 where there are none)."""
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the sampled tokens' log-probabilities under
    the policy and the reference. With r = logπ - logπ_ref: k1 = r (unbiased, can be
    negative), k2 = r²/2 (low variance, biased), k3 = e^{-r} - 1 + r (unbiased, ≥ 0)."""
    r = logp - ref_logp
    if kind == "k1":
        return r
    if kind == "k2":
        return 0.5 * r**2
    if kind == "k3":
        return torch.expm1(-r) + r
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real response token (its EOS, or the last token of a
    response cut at max_new_tokens). Every response must have at least one token."""
    lengths = mask.sum(1).long()
    if bool((lengths == 0).any()):
        raise ValueError("a response with no tokens has no place for its score")
    return lengths - 1


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: -β·KL_t on every real token, plus the sequence's score on its last
    real token; 0 on padding."""
    rewards = -kl_coef * kl * mask
    idx = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, idx] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (A + V). Past a sequence's last real
    token there is no next state: its bootstrap value and advantage count as 0."""
    b, t = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    next_mask = torch.zeros_like(next_adv)
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value * next_mask - values[:, i]
        next_adv = delta + gamma * lam * next_mask * next_adv
        advantages[:, i] = next_adv
        next_value, next_mask = values[:, i], mask[:, i]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (to minimise) and its diagnostics: the share of tokens where
    the clip was active, and an estimate of KL(π_old‖π) over the update.

    ``weights``: per-token importance weights for responses sampled by another policy than
    π_old (``behaviour_weights``): the surrogate's ratio is π/π_old, clipped as usual, and each
    token's term is multiplied by the weight (the decoupled PPO objective of asynchronous RL:
    π/π_behaviour = π/π_old · π_old/π_behaviour, the clip on the first factor, the truncation on
    the second)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = masked_mean(per_token, mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, stats


def behaviour_weights(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights min(π_old/π_behaviour, cap) per token (no gradient), for
    responses sampled by the rollout engine's policy π_behaviour while π_old is the trainer's
    policy at the start of the update: a stale policy version in async mode, and numerical
    differences of the engine's kernels in any mode. Truncation bounds the variance a rare
    token with a tiny behaviour probability would add (Espeholt et al. 2018, IMPALA's ρ̄)."""
    with torch.no_grad():
        w = torch.exp(old_logp - behaviour_logp)
        truncated = (w > cap).to(w.dtype)
        w = w.clamp(max=cap) * mask
        stats = {
            "is_weight_mean": masked_mean(w, mask),
            "is_truncated": masked_mean(truncated, mask),
            # KL(π_behaviour‖π_old) estimated on the behaviour policy's own samples
            "behaviour_kl": masked_mean(behaviour_logp - old_logp, mask),
        }
    return w, stats


def group_advantages(scores: torch.Tensor, group_size: int, kind: str, eps: float = 1e-6) -> torch.Tensor:
    """One advantage per response for the critic-free algorithms: ``scores`` holds groups of
    ``group_size`` consecutive responses to the same prompt, and each response is compared with
    the others of its group instead of a learned value.

    grpo   (r - mean(group)) / (std(group) + eps)      (Shao et al. 2024; std with n-1)
    rloo   r - mean(the other k-1 of its group)        (Ahmadian et al. 2024) = k/(k-1)·(r - mean)

    A group whose scores are all equal has advantage 0 everywhere: it teaches nothing."""
    if group_size < 2:
        raise ValueError("a group baseline needs at least 2 responses per prompt")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not form groups of {group_size}")
    g = scores.float().view(-1, group_size)
    mean = g.mean(1, keepdim=True)
    if kind == "grpo":
        adv = (g - mean) / (g.std(1, keepdim=True) + eps)
    elif kind == "rloo":
        adv = (g - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown critic-free algorithm {kind!r}; expected grpo or rloo")
    return adv.reshape(-1)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: the new value may not move more than ``clip`` from the rollout's
    value for free (PPO2's value clipping)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    return loss, {"vf_clipfrac": masked_mean((l2 > l1).to(values.dtype), mask)}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class AdaptiveKL:
    """β that follows a target KL (Ziegler et al. 2019): β ← β·(1 + clip(KL/target - 1,
    ±0.2)·n/horizon) after n samples. ``target=None`` keeps β fixed."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        if init < 0:
            raise ValueError("kl_coef must be >= 0")
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.target is not None and self.target > 0:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), state["target"], int(state["horizon"])
