"""Constitutions: load, validate, hash, and sample principles.

A constitution file (YAML) holds a name, version, description, a list of principles and
few-shot examples, and optionally ``refusal``: what ``cai-ray serve`` with ``guard:
classifier`` answers in place of a flagged prompt or answer. Validation collects every
problem and names the file, the principle and the field, so a typo is found in one pass:

    constitutions/x.yaml: principle 'privacy' (#3): field 'weight': must be a positive number
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# `provenance`: where a generated constitution came from (`constitution collect` writes the
# votes behind each principle); a mapping, checked to be one, read by people, not by stages
TOP_KEYS = {"name", "version", "description", "principles", "examples", "provenance", "refusal"}
# what the serve guard answers when a constitution gives no `refusal:`; it opens like a refusal
# (core.refusal.is_refusal), so refusal rates count it
DEFAULT_REFUSAL = (
    "I can't help with that, because it goes against the principles I follow. "
    "If there is something else you need, I'm glad to help."
)
PRINCIPLE_TEXT_FIELDS = ("critique_request", "revision_request", "comparison_question")
PRINCIPLE_KEYS = {"id", "category", "weight", "probes", "provenance", *PRINCIPLE_TEXT_FIELDS}
CRITIQUE_EXAMPLE_KEYS = {"principle", "prompt", "response", "critique", "revision"}
COMPARISON_EXAMPLE_KEYS = {"principle", "prompt", "response_a", "response_b", "answer", "reasoning"}


class ConstitutionError(ValueError):
    """Raised with every problem found in a constitution file, one per line."""


@dataclass(frozen=True)
class Principle:
    id: str
    category: str
    weight: float
    critique_request: str
    revision_request: str
    comparison_question: str
    # optional prompts that test this principle alone: `cai-ray eval` answers them with every
    # model and judges the answers against this principle only (its "probe violation rate")
    probes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CritiqueExample:
    principle: str
    prompt: str
    response: str
    critique: str
    revision: str


@dataclass(frozen=True)
class ComparisonExample:
    principle: str
    prompt: str
    response_a: str
    response_b: str
    answer: str  # "A" or "B"
    reasoning: str = ""


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    description: str
    principles: tuple[Principle, ...]
    critique_examples: tuple[CritiqueExample, ...] = ()
    comparison_examples: tuple[ComparisonExample, ...] = ()
    refusal: str = DEFAULT_REFUSAL
    path: str = ""
    sha256: str = field(default="", compare=False)

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise KeyError(f"constitution {self.name!r} has no principle {pid!r}")

    @functools.cached_property
    def _cumulative_weights(self) -> list[float]:
        return list(itertools.accumulate(p.weight for p in self.principles))

    def sample(self, key: str, n: int, seed: int) -> list[Principle]:
        """``n`` principles drawn by weight, with replacement, for one row.

        Each draw is a hash of (seed, key, draw index) rather than a shared random stream,
        so the draw for a row is the same whichever actor, batch or resumed run handles it.
        """
        cum = self._cumulative_weights
        out = []
        for i in range(n):
            digest = hashlib.blake2b(f"{seed}\x00{key}\x00{i}".encode(), digest_size=8).digest()
            u = int.from_bytes(digest, "big") / 2.0**64 * cum[-1]
            out.append(self.principles[min(bisect.bisect_right(cum, u), len(cum) - 1)])
        return out

    def sample_distinct(self, key: str, n: int, seed: int) -> list[Principle]:
        """``n`` different principles drawn by weight (without replacement), for a
        principle ensemble; all of them, in draw order, when ``n`` >= their number.
        Seeded per key like ``sample``: the same pair gets the same principles anywhere."""
        n = min(n, len(self.principles))
        picked: list[Principle] = []
        left = list(self.principles)
        for i in range(n):
            digest = hashlib.blake2b(f"{seed}\x00{key}\x00distinct{i}".encode(), digest_size=8).digest()
            cum = list(itertools.accumulate(p.weight for p in left))
            u = int.from_bytes(digest, "big") / 2.0**64 * cum[-1]
            picked.append(left.pop(min(bisect.bisect_right(cum, u), len(cum) - 1)))
        return picked

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "path": self.path,
            "sha256": self.sha256,
            "principles": len(self.principles),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            # probes only where a principle has them: the same output as before for the rest
            "principles": [
                {k: list(v) if k == "probes" else v for k, v in asdict(p).items() if k != "probes" or v}
                for p in self.principles
            ],
            "examples": {
                "critique_revision": [asdict(e) for e in self.critique_examples],
                "comparison": [asdict(e) for e in self.comparison_examples],
            },
            "refusal": self.refusal,
        }


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def load_constitution(path: str | Path) -> Constitution:
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConstitutionError(f"{where}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"{where}: not UTF-8 text ({e})") from None
    return constitution_from_text(text, where)


def constitution_from_text(text: str, where: str = "<constitution>") -> Constitution:
    """A constitution file's text, checked as ``load_constitution`` checks the file at ``where``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConstitutionError(f"{where}: invalid YAML: {e}") from None
    return parse_constitution(raw, where=where, sha256=hashlib.sha256(text.encode()).hexdigest())


def parse_constitution(raw: Any, where: str = "<constitution>", sha256: str = "") -> Constitution:
    errors: list[str] = []

    def err(msg: str) -> None:
        errors.append(f"{where}: {msg}")

    if not isinstance(raw, dict):
        raise ConstitutionError(f"{where}: top level must be a mapping, got {type(raw).__name__}")
    for key in sorted(set(raw) - TOP_KEYS):
        err(f"unknown top-level field {key!r} (allowed: {', '.join(sorted(TOP_KEYS))})")
    for key in ("name", "version", "description"):
        if not _nonempty_str(raw.get(key)):
            err(f"field {key!r}: must be a non-empty string")
    if not isinstance(raw.get("provenance", {}), dict):
        err(f"field 'provenance': must be a mapping, got {type(raw['provenance']).__name__}")
    if "refusal" in raw and not _nonempty_str(raw["refusal"]):
        err(f"field 'refusal': must be a non-empty string (or left out for the default), got {raw['refusal']!r}")

    principles: list[Principle] = []
    items = raw.get("principles")
    if not isinstance(items, list) or not items:
        err("field 'principles': must be a non-empty list")
        items = []
    seen: set[str] = set()
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            err(f"principle #{i}: must be a mapping")
            continue
        pid = item.get("id")
        label = f"principle {pid!r} (#{i})" if isinstance(pid, str) else f"principle #{i}"
        for key in sorted(set(item) - PRINCIPLE_KEYS):
            err(f"{label}: unknown field {key!r}")
        ok = True
        if not isinstance(pid, str) or not ID_PATTERN.match(pid):
            err(f"{label}: field 'id': must match {ID_PATTERN.pattern}")
            ok = False
        elif pid in seen:
            err(f"{label}: field 'id': duplicate id")
            ok = False
        else:
            seen.add(pid)
        if not isinstance(item.get("provenance", {}), dict):
            err(f"{label}: field 'provenance': must be a mapping, got {type(item['provenance']).__name__}")
            ok = False
        if not _nonempty_str(item.get("category")):
            err(f"{label}: field 'category': must be a non-empty string")
            ok = False
        weight = item.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight > 0)
        ):
            err(f"{label}: field 'weight': must be a positive number, got {weight!r}")
            ok = False
        for key in PRINCIPLE_TEXT_FIELDS:
            if not _nonempty_str(item.get(key)):
                err(f"{label}: field {key!r}: must be a non-empty string")
                ok = False
        probes = item.get("probes")
        probes = [] if probes is None else probes  # absent or `probes:` with nothing: none
        if not isinstance(probes, list):
            err(f"{label}: field 'probes': must be a list of prompts, got {type(probes).__name__}")
            ok = False
        else:
            for j, probe in enumerate(probes, start=1):
                if not _nonempty_str(probe):
                    err(f"{label}: field 'probes' #{j}: must be a non-empty string, got {probe!r}")
                    ok = False
            # a repeated probe would count twice in its principle's probe violation rate
            texts = [x.strip() for x in probes if _nonempty_str(x)]
            for dup in sorted({x for x in texts if texts.count(x) > 1}):
                err(f"{label}: field 'probes': repeated prompt {dup!r}")
                ok = False
        if ok:
            principles.append(
                Principle(
                    id=pid,
                    category=item["category"].strip(),
                    weight=float(weight),
                    **{k: item[k].strip() for k in PRINCIPLE_TEXT_FIELDS},
                    probes=tuple(x.strip() for x in probes),
                )
            )

    examples = raw.get("examples") or {}
    critique_examples: list[CritiqueExample] = []
    comparison_examples: list[ComparisonExample] = []
    if not isinstance(examples, dict):
        err("field 'examples': must be a mapping with 'critique_revision' and 'comparison'")
        examples = {}
    for key in sorted(set(examples) - {"critique_revision", "comparison"}):
        err(f"examples: unknown field {key!r}")
    for kind, keys, required, out, cls in (
        ("critique_revision", CRITIQUE_EXAMPLE_KEYS, CRITIQUE_EXAMPLE_KEYS, critique_examples, CritiqueExample),
        (
            "comparison",
            COMPARISON_EXAMPLE_KEYS,
            COMPARISON_EXAMPLE_KEYS - {"reasoning"},
            comparison_examples,
            ComparisonExample,
        ),
    ):
        items = examples.get(kind) or []
        if not isinstance(items, list):
            err(f"examples.{kind}: must be a list")
            continue
        for i, ex in enumerate(items, start=1):
            label = f"examples.{kind} #{i}"
            if not isinstance(ex, dict):
                err(f"{label}: must be a mapping")
                continue
            ok = True
            for key in sorted(set(ex) - keys):
                err(f"{label}: unknown field {key!r}")
                ok = False
            for key in sorted(required):
                if not _nonempty_str(ex.get(key)):
                    err(f"{label}: field {key!r}: must be a non-empty string")
                    ok = False
            if "reasoning" in ex and not isinstance(ex["reasoning"], str):
                err(f"{label}: field 'reasoning': must be a string")
                ok = False
            if _nonempty_str(ex.get("principle")) and ex["principle"] not in seen:
                err(f"{label}: field 'principle': no principle with id {ex['principle']!r}")
                ok = False
            if kind == "comparison" and ex.get("answer") not in ("A", "B", None):
                err(f"{label}: field 'answer': must be 'A' or 'B', got {ex.get('answer')!r}")
                ok = False
            if ok:
                out.append(cls(**{k: v.strip() if isinstance(v, str) else v for k, v in ex.items()}))

    if errors:
        raise ConstitutionError("\n".join(errors))
    return Constitution(
        name=raw["name"].strip(),
        version=str(raw["version"]).strip(),
        description=raw["description"].strip(),
        principles=tuple(principles),
        critique_examples=tuple(critique_examples),
        comparison_examples=tuple(comparison_examples),
        refusal=raw["refusal"].strip() if "refusal" in raw else DEFAULT_REFUSAL,
        path=where,
        sha256=sha256 or hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest(),
    )


# -- several constitutions in one run ---------------------------------------------------------------
def constitution_id(c: Constitution) -> str:
    """What a row records of its constitution: its name and the start of its hash."""
    return f"{c.name}@{c.sha256[:12]}"


def constitution_map(spec: str | None) -> dict[str, str]:
    """``VALUE=FILE,VALUE=FILE`` → {value: file}; a malformed spec is a ValueError naming the part."""
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        value, sep, path = part.partition("=")
        if not sep or not value.strip() or not path.strip():
            raise ValueError(f"constitutions: expected VALUE=FILE pairs, comma-separated; got {part.strip()!r}")
        if value.strip() in out:
            raise ValueError(f"constitutions: {value.strip()!r} is mapped twice")
        out[value.strip()] = path.strip()
    return out


class ConstitutionRouter:
    """Which constitution applies to a row: ``by[value]`` for a row whose ``field`` has that
    value, else the default. One constitution when ``field`` is None."""

    def __init__(self, default: Constitution, field: str | None = None, by: dict[str, Constitution] | None = None):
        self.default, self.field, self.by = default, field, dict(by or {})

    @classmethod
    def load(cls, default: str, field: str | None, spec: str | None) -> ConstitutionRouter:
        """The constitutions of a config: ``default`` (a file), and per value of ``field`` the
        files of ``spec`` (``VALUE=FILE,...``)."""
        by = {v: load_constitution(f) for v, f in constitution_map(spec).items()}
        return cls(load_constitution(default), field, by)

    @property
    def all(self) -> list[Constitution]:
        """Every distinct constitution, the default first."""
        out = [self.default]
        for c in self.by.values():
            if c.sha256 not in {x.sha256 for x in out}:
                out.append(c)
        return out

    def of_value(self, value: Any) -> Constitution:
        if self.field is None or value is None:
            return self.default
        return self.by.get(str(value), self.default)

    def of_meta(self, meta: str | None) -> Constitution:
        """The constitution of a batch row whose other fields are the JSON ``meta``."""
        if self.field is None or not meta:
            return self.default
        return self.of_value(json.loads(meta).get(self.field))
