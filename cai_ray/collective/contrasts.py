"""Candidate principles measured from the pairs themselves, without a model: surface
contrasts between the chosen and the rejected replies (length, capitals, questions, lists,
refusals, ...). A contrast that holds in most training pairs becomes a comparison question
("Which reply uses fewer capital letters?") scored like any draft; it is also shown to the
drafting model. A small drafting model cannot see "the preferred replies are never in
capitals"; counting can.

    contrast(pairs, feature) = share of the pairs where f(chosen) > f(rejected), and where <
    (ties count for neither); kept when one side holds in >= ``min_share`` of all pairs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cai_ray.core.refusal import is_refusal

_LETTERS = re.compile(r"[A-Za-z]")
_UPPER = re.compile(r"[A-Z]")


def _capitals(text: str) -> float:
    letters = _LETTERS.findall(text)
    return len(_UPPER.findall(text)) / len(letters) if letters else 0.0


def _list_items(text: str) -> float:
    return float(len(re.findall(r"(?m)^\s*(?:[-*•]|\d+[.)])\s+", text)))


# feature → (its measure, the question when the chosen reply has more, when it has less)
FEATURES: dict[str, tuple[Callable[[str], float], str, str]] = {
    "length": (lambda t: float(len(t)), "Which reply is longer and more detailed?", "Which reply is shorter?"),
    "capitals": (_capitals, "Which reply uses more capital letters?", "Which reply uses fewer capital letters?"),
    "questions": (
        lambda t: float(t.count("?")),
        "Which reply asks the human more questions?",
        "Which reply asks the human fewer questions?",
    ),
    "exclamations": (
        lambda t: float(t.count("!")),
        "Which reply uses more exclamation marks?",
        "Which reply uses fewer exclamation marks?",
    ),
    "lists": (_list_items, "Which reply is organised as a list?", "Which reply avoids lists?"),
    "digits": (
        lambda t: float(len(re.findall(r"\d", t))),
        "Which reply gives more numbers and figures?",
        "Which reply gives fewer numbers and figures?",
    ),
    "refusal": (
        lambda t: float(is_refusal(t)),
        "Which reply declines or refuses the request?",
        "Which reply helps instead of refusing?",
    ),
}


@dataclass(frozen=True)
class Contrast:
    feature: str
    direction: str  # "more" | "less": what the chosen reply has
    share: float  # of all pairs where the chosen reply has it
    pairs: int
    question: str

    def describe(self) -> str:
        return f"the preferred reply has {'more' if self.direction == 'more' else 'less'} {self.feature} in {self.share:.0%} of pairs"


def contrasts(chosen: list[str], rejected: list[str], min_share: float = 0.75) -> list[Contrast]:
    """The features whose direction (chosen has more, or less) holds in at least ``min_share``
    of the pairs, strongest first."""
    n = len(chosen)
    out = []
    for name, (f, more_q, less_q) in FEATURES.items():
        if not n:
            break
        diffs = [f(c) - f(r) for c, r in zip(chosen, rejected)]
        more, less = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        for direction, count, q in (("more", more, more_q), ("less", less, less_q)):
            if count / n >= min_share:
                out.append(Contrast(name, direction, round(count / n, 4), n, q))
    return sorted(out, key=lambda c: (-c.share, c.feature))
