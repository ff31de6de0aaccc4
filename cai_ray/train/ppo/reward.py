"""Where an RL step's scores come from: a preference model, a reward function, or the AI labeler.

    (prompt messages, response text) ─► RewardScorer.score ─► one float per response (+ what happened)
        model     r(prompt + response), the preference model's chat-template input (as it was trained)
        function  NAME(prompts, responses) from FILE.py:NAME or MODULE:NAME (rule-based rewards)
        labeler   d-RLAIF: P(response better than a reference answer) from the labeler, both orders

PPO, GRPO and RLOO all score through this one class, so a reward means the same thing in each.
The optional length penalty and clipping are applied here, after the source.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cai_ray.train.ppo.config import RewardSection

Messages = list[dict[str, str]]


class RewardError(ValueError):
    """A reward source that cannot be loaded or returned something unusable."""


def local_path(path: str, base: str | None) -> Path:
    """``path`` as given when it exists (a submitted job's working dir), else under ``base``
    (the driver's working dir: local Ray workers run in another directory)."""
    p = Path(path)
    if not p.exists() and base and not p.is_absolute():
        return Path(base) / p
    return p


def load_function(spec: str, base: str | None = None) -> Callable:
    """``FILE.py:NAME`` or ``MODULE:NAME``. A relative file is looked up in the working dir
    (a submitted job's upload), then under ``base`` (the driver's working dir: local Ray
    workers run elsewhere)."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = local_path(target, base)
        if not path.is_file():
            raise RewardError(f"reward.function: file {target} not found")
        mod_spec = importlib.util.spec_from_file_location(f"cai_ray_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say which one failed and why
            raise RewardError(f"reward.function: importing {target} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"reward.function: cannot import module {target!r}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward.function: {target} has no function {name!r}")
    return fn


class RewardScorer:
    """Scores responses as a ``RewardSection`` says (its ``kind``: the source in use).
    ``base_dir``: where relative files it names are when they are not here (the driver's
    working dir, for Ray workers that run elsewhere)."""

    def __init__(
        self,
        reward: RewardSection,
        base_dir: str = "",
        device: str = "cpu",
        seed: int = 0,
        reference_answer: Callable[[list[Messages]], list[str]] | None = None,
        dtype=None,
        prepare: Callable | None = None,
        cache_references: bool = True,
    ):
        """``dtype``: the preference model's (the trainer's precision; default float32).
        ``prepare``: what places it (PPO under ZeRO-3 partitions it across the ranks like its
        own models); default: the whole model on ``device``. ``cache_references``: keep each
        prompt's d-RLAIF reference answer; off when generating one takes every rank in step
        (ZeRO-3), since ranks whose prompts are cached would skip the generation the others
        wait in."""
        self.r = reward
        self.kind = kind = reward.kind
        self.device = device
        self.calls = 0
        self.invalid = 0  # d-RLAIF comparisons the labeler could not score (reward 0.5 given, counted)
        if kind == "model":
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from cai_ray.models import resolve_model

            path = resolve_model(reward.model)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.tokenizer.padding_side = "right"
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype or torch.float32
            ).requires_grad_(False)
            model.config.pad_token_id = self.tokenizer.pad_token_id
            self.model = prepare(model) if prepare else model.to(device).eval()
        elif kind == "function":
            self.fn = load_function(reward.function, base_dir)
        elif kind == "labeler":
            from cai_ray.core.constitution import load_constitution
            from cai_ray.core.labeler import Labeler, LabelSettings
            from cai_ray.engine import engine_from_section

            engine = engine_from_section(reward.labeler)
            settings = LabelSettings.of(reward.method, seed)
            self.labeler = Labeler(engine, load_constitution(local_path(reward.constitution, base_dir)), settings)
            self.reference_answer = reference_answer
            self._references: dict[str, str] = {}
            self.cache_references = cache_references
        else:
            raise RewardError(f"unknown reward source {kind!r}")

    # -- the one entry point ----------------------------------------------------------------
    def score(
        self,
        ids: list[str],
        prompts: list[Messages],
        responses: list[str],
        lengths: list[int],
        references: list[str | None] | None = None,
    ) -> list[float]:
        """One score per response, after the length penalty and clipping."""
        self.calls += 1
        if self.kind == "model":
            raw = self._score_model(prompts, responses)
        elif self.kind == "function":
            raw = self._score_function(prompts, responses)
        else:
            raw = self._score_labeler(ids, prompts, responses, references)
        out = []
        for s, n in zip(raw, lengths):
            s = s - self.r.length_penalty * n
            if self.r.clip is not None:
                s = max(-self.r.clip, min(self.r.clip, s))
            out.append(s)
        return out

    def _score_model(self, prompts: list[Messages], responses: list[str], batch: int = 16) -> list[float]:
        import torch

        from cai_ray.engine import preference_text

        texts = [preference_text(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for i in range(0, len(texts), batch):
            enc = self.tokenizer(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[:, 0]
            out += logits.float().tolist()
        return out

    def _score_function(self, prompts: list[Messages], responses: list[str]) -> list[float]:
        got = self.fn(prompts, responses)
        try:
            got = [float(x) for x in got]
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward.function {self.r.function} must return numbers, got {got!r:.200}") from e
        if len(got) != len(responses):
            raise RewardError(
                f"reward.function {self.r.function} returned {len(got)} scores for {len(responses)} responses"
            )
        bad = [x for x in got if not math.isfinite(x)]
        if bad:
            raise RewardError(f"reward.function {self.r.function} returned non-finite scores: {bad[:3]}")
        return got

    def _score_labeler(
        self, ids: list[str], prompts: list[Messages], responses: list[str], references: list[str | None] | None
    ) -> list[float]:
        if self.r.reference == "field":
            refs = list(references or [None] * len(ids))
            missing = [i for i, x in zip(ids, refs) if not x]
            if missing:
                raise RewardError(f"reward.reference=field, but prompt rows {missing[:5]} have no 'reference'")
        else:
            if not self.cache_references:
                self._references = {}
            todo = [(i, p) for i, p in zip(ids, prompts) if i not in self._references]
            if todo:
                for (i, _), text in zip(todo, self.reference_answer([p for _, p in todo])):
                    self._references[i] = text
            refs = [self._references[i] for i in ids]
        labels = self.labeler.label([f"{i}:{self.calls}" for i in ids], prompts, responses, refs)
        out = []
        for lab in labels:
            if lab.p_a is None:
                self.invalid += 1
                out.append(0.5)  # no preference: the answer neither gains nor loses (counted in metrics)
            else:
                out.append(lab.p_a)
        return out
