"""Reward functions for the RL tests (loaded with reward.function=tests/data/rewards.py:NAME)."""


def prefer_ugs(prompts, responses):
    """Prefers one particular token: tiny-random's favourite first answer token to the test
    prompt decodes to "ugs" (about 9% likely at the start); one point per occurrence."""
    return [float(r.count("ugs")) for r in responses]


def not_a_list(prompts, responses):
    return 3.0


def by_length(prompts, responses):
    """Longer answers score higher: a reward that varies for any model."""
    return [float(len(r)) / 10 for r in responses]
