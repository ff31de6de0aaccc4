"""The RLAIF method itself, without Ray: an AI labeler that compares two answers against the
constitution's principles, both orders, soft and position-debiased (``Labeler``), and the
settings that define the method (``LabelSettings``). The label step (label.py), serving
(/v1/label), the labeler reward of RL (train/reward.py) and evaluation's judge all use this
one implementation.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from cai_ray.config.sections import LabelerConfig
from cai_ray.core import label_math, prompts
from cai_ray.core.constitution import Constitution
from cai_ray.core.seeds import batch_seed
from cai_ray.core.types import Sampling, Unscored


@dataclass(frozen=True)
class LabelSettings(LabelerConfig):
    """The labeling method as the labeler runs it: the ``method`` config section (its fields,
    defaults and checks are ``LabelerConfig``'s, not repeated here) plus the run's seed."""

    seed: int = 0

    @classmethod
    def of(cls, section, seed: int) -> LabelSettings:
        """From a ``method`` config section (a LabelerConfig, or its plain values) and the
        run's seed: the one way these are built."""
        values = section if isinstance(section, dict) else asdict(section)
        return cls(**{f.name: values[f.name] for f in fields(LabelerConfig)}, seed=seed)


# the PairLabel fields that become output columns as they are
PAIR_LABEL_COLUMNS = (
    "p_a",
    "p_ab",
    "p_ba",
    "position_consistent",
    "principle_ids",
    "p_ab_by_principle",
    "p_ba_by_principle",
    "reasoning",
)


@dataclass
class PairLabel:
    p_a: float | None
    p_ab: float | None
    p_ba: float | None
    position_consistent: bool | None
    principle_ids: list[str]
    p_ab_by_principle: list[float] | None
    p_ba_by_principle: list[float] | None
    reasoning: list[str] | None
    invalid: str | None  # why this pair has no label


def strip_final_answer(reasoning: str) -> str:
    """The reasoning without its closing "The answer is: (X)" line (scoring re-asks it)."""
    matches = list(re.finditer(r"(?:the\s+)?answer\s+is:?\s*\(?\s*[AB]\b", reasoning, re.I))
    return reasoning[: matches[-1].start()].rstrip() if matches else reasoning.rstrip()


class Labeler:
    """Labels pairs with an engine. Pure orchestration around ``choice_logprobs`` and, in
    CoT mode, ``generate``; the Ray actor (LabelWorker) and the benchmark both use it."""

    def __init__(self, engine, constitution: Constitution, settings: LabelSettings):
        self.engine = engine
        self.constitution = constitution
        self.s = settings
        self.shots = prompts.comparison_shots(constitution, settings.few_shot, settings.cot)
        self.template_sha256 = prompts.template_sha256(self.shots, settings.cot)
        self.comparisons = 0
        # An engine that is a cai-ray server labels whole pairs itself (/v1/label): the same
        # code on its side, so only the method has to match.
        self.remote = getattr(engine, "label_pairs", None)
        if self.remote is not None:
            theirs = engine.label_method
            diff = {k: {"here": v, "server": theirs.get(k)} for k, v in self.method().items() if theirs.get(k) != v}
            if diff:
                raise ValueError(
                    f"the labeler server {engine.model_name} labels with another method than this "
                    f"job: {diff}; start it with the same constitution and label settings"
                )

    def method(self) -> dict[str, Any]:
        """What decides a label besides the model (principle sampling aside): a remote
        labeler must match it."""
        m = {
            "constitution_sha256": self.constitution.sha256,
            "template_sha256": self.template_sha256,
            "both_orders": self.s.both_orders,
            "cot": self.s.cot,
        }
        if self.s.cot:
            m.update(
                clamp_low=self.s.clamp_low,
                clamp_high=self.s.clamp_high,
                cot_max_new_tokens=self.s.cot_max_new_tokens,
                cot_temperature=self.s.cot_temperature,
            )
        return m

    @property
    def budget(self) -> int:
        """Tokens a comparison needs after its prompt (``context.context_overflow``'s budget):
        the choice; with CoT, the reasoning, then "The answer is: (" and the choice."""
        return self.s.cot_max_new_tokens + 8 if self.s.cot else 1

    def orders(self) -> tuple[str, ...]:
        return ("AB", "BA") if self.s.both_orders else ("AB",)

    def principles_for(self, pair_id: str, principles=None) -> list:
        """The principles that judge a pair: those given, else K drawn by its id (seeded, distinct)."""
        return principles or self.constitution.sample_distinct(pair_id, self.s.principles_per_pair, self.s.seed)

    def comparisons_for(self, pair_id: str, prompt, a: str, b: str, principles=None):
        """[(principle, order, messages)] for one pair: K principles (sampled by pair id, or
        the ``principles`` given) x the orders."""
        out = []
        prefill = prompts.COT_PREFIX if self.s.cot else prompts.ANSWER_PREFIX
        for p in self.principles_for(pair_id, principles):
            for order in self.orders():
                first, second = (a, b) if order == "AB" else (b, a)
                out.append(
                    (p, order, prompts.comparison_messages(self.shots, prompt, first, second, p, prefill, self.s.cot))
                )
        return out

    def label(
        self, pair_ids: list[str], convs: list, resp_a: list[str], resp_b: list[str], principles: list | None = None
    ) -> list[PairLabel]:
        """One label per pair; ``principles`` (a list of Principle lists, one per pair; None
        entries sample) fixes which principles judge a pair."""
        chosen = principles or [None] * len(pair_ids)
        if self.remote is not None:
            return self._label_remote(pair_ids, convs, resp_a, resp_b, chosen)
        per_pair = [
            self.comparisons_for(pid, c, a, b, ps) for pid, c, a, b, ps in zip(pair_ids, convs, resp_a, resp_b, chosen)
        ]
        flat = [m for comps in per_pair for _, _, m in comps]
        self.comparisons += len(flat)
        reasoning: list[str | None] = [None] * len(flat)
        invalid: list[str | None] = [None] * len(flat)
        if self.s.cot:
            params = Sampling(
                temperature=self.s.cot_temperature,
                top_p=1.0,
                max_new_tokens=self.s.cot_max_new_tokens,
                seed=batch_seed(self.s.seed, pair_ids, "cot"),
            )
            texts = self.engine.generate(flat, params) if flat else []
            to_score = []
            for j, text in enumerate(texts):
                reasoning[j] = text
                choice, why = label_math.parse_choice(text)
                if choice is None:
                    invalid[j] = why
                    continue
                body = prompts.quote(strip_final_answer(text))
                conv = flat[j][:-1] + [prompts.assistant(f"{prompts.COT_PREFIX} {body}\n{prompts.ANSWER_PREFIX}")]
                to_score.append((j, conv))
            scored = self.engine.choice_logprobs([c for _, c in to_score], prompts.CHOICES) if to_score else []
            p_option_a: list[float | None] = [None] * len(flat)
            for (j, _), lp in zip(to_score, scored):
                if isinstance(lp, Unscored):
                    invalid[j] = lp.reason
                else:
                    p_option_a[j] = label_math.clamp(label_math.soft_label(*lp), self.s.clamp_low, self.s.clamp_high)
        else:
            scored = self.engine.choice_logprobs(flat, prompts.CHOICES) if flat else []
            p_option_a = [None] * len(flat)
            for j, lp in enumerate(scored):
                if isinstance(lp, Unscored):
                    invalid[j] = lp.reason
                else:
                    p_option_a[j] = label_math.soft_label(*lp)

        labels, j = [], 0
        for comps in per_pair:
            ab, ba, why, texts = {}, {}, None, []
            for principle, order, _ in comps:
                texts.append(reasoning[j])
                if invalid[j] is not None and why is None:
                    why = f"invalid labeler output (principle {principle.id}, order {order}): {invalid[j]}"
                elif invalid[j] is None:
                    p = p_option_a[j]
                    if order == "AB":
                        ab[principle.id] = p
                    else:
                        ba[principle.id] = label_math.from_swapped(p)
                j += 1
            pids = list(dict.fromkeys(p.id for p, _, _ in comps))
            reasoning_out = texts if self.s.cot else None
            if why is not None:
                labels.append(PairLabel(None, None, None, None, pids, None, None, reasoning_out, why))
                continue
            p_ab_list = [ab[p] for p in pids]
            p_ab = label_math.ensemble(p_ab_list)
            if self.s.both_orders:
                p_ba_list = [ba[p] for p in pids]
                p_ba = label_math.ensemble(p_ba_list)
                p_a, consistent = label_math.debias(p_ab, p_ba)
            else:
                p_ba_list, p_ba, p_a, consistent = None, None, p_ab, None
            labels.append(PairLabel(p_a, p_ab, p_ba, consistent, pids, p_ab_list, p_ba_list, reasoning_out, None))
        return labels

    def _label_remote(self, pair_ids, convs, resp_a, resp_b, chosen) -> list[PairLabel]:
        """Principles drawn here (same seed and rule as local labeling), labels from the
        server's /v1/label."""
        ids = [[p.id for p in self.principles_for(pid, ps)] for pid, ps in zip(pair_ids, chosen)]
        self.comparisons += sum(len(x) for x in ids) * len(self.orders())
        out = self.remote(convs, resp_a, resp_b, ids)
        return [PairLabel(**{k: r.get(k) for k in (*PAIR_LABEL_COLUMNS, "invalid")}) for r in out]
