"""`cai-ray constitution derive`: preference pairs → the principles that explain them.

Inverse Constitutional AI (Findeis et al. 2024, "Inverse Constitutional AI: Compressing
Preferences into Principles", arXiv 2406.06560): propose principles from the data, keep the
ones an AI labeler can use to reconstruct the preferences.

    read       preference_pairs.read_pairs: pairs, rejects (FILE.rejects.jsonl)
    split      training / held-out pairs, by a seeded hash of the pair id (``--held-out``)
    cluster    training pairs by which words tell chosen from rejected (k-means, ``--clusters``)
    draft      per cluster the engine sees ``--examples`` pairs and the cluster's telling words
               and writes the rule as "Which reply ...?"; drafts that do not parse are counted
    candidates the parsed drafts + the questions of ``--candidates`` (a constitution or a text
               file), each with where it came from
    score      the core labeler with that one principle, both orders, on every held-out pair:
               accuracy = share of pairs with debiased p(chosen) > 0.5, Wilson 95% interval
    write      the best ``--k`` above ``--min-accuracy`` as principles (id derived-N, category
               "derived", weight = accuracy) with their provenance, validated with
               ``load_constitution`` before it replaces FILE; every candidate, scored, to
               FILE.candidates.jsonl

The engine runs in this process (no Ray), like ``collect``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cai_ray.batch.readers import RowsError
from cai_ray.batch.records import reasons_count
from cai_ray.collective.contrasts import contrasts
from cai_ray.collective.files import sha256_of, write_constitution, write_jsonl
from cai_ray.collective.preference_pairs import (
    Clusters,
    Pair,
    cluster_pairs,
    difference_features,
    read_pairs,
    split_held_out,
    top_words,
)
from cai_ray.core.constitution import Constitution, ConstitutionError, Principle, load_constitution
from cai_ray.core.eval_math import wilson_interval
from cai_ray.core.labeler import Labeler, LabelSettings
from cai_ray.core.prompts import assistant, user
from cai_ray.core.types import Sampling

CATEGORY = "derived"
DEFAULT_NAME = "derived"
DEFAULT_DESCRIPTION = (
    "Principles derived from a preference dataset (Inverse Constitutional AI): each one lets the "
    "AI labeler, using that principle alone, reconstruct the preferences on held-out pairs."
)
DRAFT_PREFIX = "Which reply"
EXAMPLE_CHARS = 300  # of each reply shown to the drafting model: a 135M model's context is 2k tokens


class DeriveError(ValueError):
    """Unusable input, or nothing worth writing: the command exits 2 and writes nothing."""


# -- drafting ------------------------------------------------------------------------------------
def _clip(text: str, n: int = EXAMPLE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def draft_messages(examples: list[Pair], more: list[str], less: list[str], hints: list[str] = ()) -> list[dict]:
    """The drafting conversation for one cluster: its example pairs and the words its chosen
    (rejected) replies have more often, then the assistant turn prefilled with "Which reply",
    so the model only has to finish the question."""
    parts = [
        "People compared two replies to the same request and preferred one. Here are pairs where "
        "the preferred reply was picked for the same reason."
    ]
    for i, p in enumerate(examples, 1):
        parts.append(
            f"Pair {i}\nRequest: {_clip(p.prompt[-1]['content'], 200)}\n"
            f"Preferred reply: {_clip(p.chosen)}\nOther reply: {_clip(p.rejected)}"
        )
    if more:
        parts.append("Words found more in the preferred replies: " + ", ".join(more))
    if less:
        parts.append("Words found more in the other replies: " + ", ".join(less))
    if hints:
        parts.append("Measured over all pairs: " + "; ".join(hints) + ".")
    parts.append(
        'What rule did people use? Write it as one short question that starts with "Which reply" '
        'and ends with "?", for example: "Which reply is more polite?"'
    )
    return [user("\n\n".join(parts)), assistant(DRAFT_PREFIX)]


def parse_question(text: str, max_words: int = 30) -> tuple[str | None, str | None]:
    """A comparison question from a draft or a candidates line → (question, None) or (None,
    why). The first line with a "?" ends there; quotes, list marks and markdown around it go."""
    text = text.strip()
    if not text:
        return None, "empty"
    line = next((x for x in text.splitlines() if "?" in x), None)
    if line is None:
        return None, "no question mark"
    q = line[: line.index("?") + 1]
    q = re.sub(r"^[\s\"'*`>#\-\d.)]+", "", q)  # leading quotes, bullets, "1.", "**"
    q = " ".join(q.split())
    body = q[:-1].strip()
    if len(WORDS.findall(body)) < 3:
        return None, f"too short: {q!r}"
    if len(WORDS.findall(body)) > max_words:
        return None, f"longer than {max_words} words"
    return q[0].upper() + q[1:], None


WORDS = re.compile(r"\w+")


def draft_text(continuation: str) -> str:
    """The whole draft: "Which reply" and the engine's continuation of it, which may start
    without its space (a tokenizer decodes the first token's leading space away) or may
    start the question again."""
    if continuation.lstrip().lower().startswith("which"):
        return continuation.strip()
    space = "" if not continuation or continuation[0].isspace() or continuation[0] in "?,.;:!" else " "
    return f"{DRAFT_PREFIX}{space}{continuation}"


def parse_draft(continuation: str) -> tuple[str | None, str | None]:
    """The engine's continuation of "Which reply" → (question, None) or (None, why)."""
    text = draft_text(continuation)
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "?" not in first:
        return None, "no question mark on the first line"
    return parse_question(first)


# -- candidates ----------------------------------------------------------------------------------
@dataclass
class Candidate:
    question: str
    source: dict  # {"kind": "draft", "cluster", "pair_ids", "draft"}, {"kind": "contrast", ...} or {"kind": "candidates", ...}
    also_from: list[dict] = field(default_factory=list)  # the same question from elsewhere
    # scores on the held-out pairs
    hits: int = 0
    n: int = 0
    invalid: int = 0
    mean_p_chosen: float | None = None

    @property
    def accuracy(self) -> float:
        return self.hits / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.hits, self.n)

    def rank_key(self) -> tuple:
        return (-self.accuracy, -self.interval[0], -(self.mean_p_chosen or 0.0))


def read_candidates(path: str | Path) -> list[tuple[str, dict]]:
    """(question, source) per candidate of a file: a constitution (.yaml/.yml: its principles'
    comparison questions, validated by the loader) or a text file (one question a line; blank
    lines and lines starting with # are skipped). A line that is no question is an error."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        try:
            c = load_constitution(path)
        except ConstitutionError as e:
            raise DeriveError(f"--candidates: {e}") from None
        return [
            (p.comparison_question, {"kind": "candidates", "file": str(path), "principle": p.id}) for p in c.principles
        ]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DeriveError(f"--candidates {path}: cannot read it ({e})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        q, why = parse_question(line)
        if q is None:
            raise DeriveError(f"--candidates {path}: line {i}: not a comparison question ({why}): {line.strip()!r}")
        out.append((q, {"kind": "candidates", "file": str(path), "line": i}))
    if not out:
        raise DeriveError(f"--candidates {path}: no questions")
    return out


def pool(entries: list[tuple[str, dict]]) -> list[Candidate]:
    """One candidate per question (case and spacing aside); a repeat is recorded, not re-scored."""
    by_text: dict[str, Candidate] = {}
    for q, source in entries:
        key = " ".join(q.lower().split())
        if key in by_text:
            by_text[key].also_from.append(source)
        else:
            by_text[key] = Candidate(q, source)
    return list(by_text.values())


# -- scoring -------------------------------------------------------------------------------------
def one_principle(question: str) -> Constitution:
    """A constitution of the one principle whose comparison question is ``question``."""
    texts = principle_texts(question)
    p = Principle(id="candidate", category=CATEGORY, weight=1.0, **texts)
    return Constitution(name="candidate", version="0", description="one candidate principle", principles=(p,))


def score(engine, candidate: Candidate, pairs: list[Pair], seed: int) -> None:
    """Label every pair with the candidate alone, chosen as A, both orders (position debiased);
    a hit is p(chosen) > 0.5. A pair the labeler cannot score is a miss, counted as invalid."""
    settings = LabelSettings(principles_per_pair=1, both_orders=True, few_shot=0, seed=seed)
    labeler = Labeler(engine, one_principle(candidate.question), settings)
    labels = labeler.label(
        [p.id for p in pairs], [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    )
    ps = [lab.p_a for lab in labels if lab.p_a is not None]
    candidate.n = len(pairs)
    candidate.hits = sum(1 for p in ps if p > 0.5)
    candidate.invalid = len(pairs) - len(ps)
    candidate.mean_p_chosen = round(sum(ps) / len(ps), 4) if ps else None


# -- writing -------------------------------------------------------------------------------------
def principle_texts(question: str) -> dict[str, str]:
    """The three requests of a principle whose comparison question is ``question``."""
    quoted = f'"{question}"'
    return {
        "critique_request": (
            "Identify ways the assistant's last reply falls short on this question, which people's "
            f"preferences answer: {quoted} Point to the exact parts, or say plainly that there are none."
        ),
        "revision_request": (
            "Rewrite the assistant's reply so it would be the better reply by this question, which "
            f"people's preferences answer, while still helping with what was asked: {quoted}"
        ),
        "comparison_question": question,
    }


def candidate_record(c: Candidate, rank: int | None, kept_as: str | None) -> dict:
    lo, hi = c.interval
    return {
        "question": c.question,
        "kept_as": kept_as,
        "rank": rank,
        "accuracy": round(c.accuracy, 4),
        "ci": [round(lo, 4), round(hi, 4)],
        "hits": c.hits,
        "n_held_out": c.n,
        "invalid": c.invalid,
        "mean_p_chosen": c.mean_p_chosen,
        "source": c.source,
        **({"also_from": c.also_from} if c.also_from else {}),
    }


def write_outputs(output: Path, text: str, rejects: list[dict], candidate_rows: list[dict]) -> dict:
    """The constitution ``text`` to ``output`` only once ``load_constitution`` takes it, then
    the rejects and the candidate table; → its summary."""
    summary = write_constitution(output, text, DeriveError, "derived")
    write_jsonl(rejects_path(output), rejects)
    write_jsonl(candidates_path(output), candidate_rows)
    return summary


def rejects_path(output: Path) -> Path:
    return output.with_name(output.name + ".rejects.jsonl")


def candidates_path(output: Path) -> Path:
    return output.with_name(output.name + ".candidates.jsonl")


# -- the command ---------------------------------------------------------------------------------
@dataclass
class Derived:
    """What the command prints: the data, the clusters, every candidate scored, the files."""

    pairs: int
    rejects: list[dict]
    train: int
    held_out: int
    clusters: list[dict]
    drafts: list[dict]  # per cluster: raw text, question or why not
    candidates: list[Candidate]  # ranked, best first
    kept: list[tuple[str, Candidate]]
    output: Path
    summary: dict

    def report(self) -> list[str]:
        parsed = sum(1 for d in self.drafts if d["question"])
        lines = [
            f"read:       {self.pairs + len(self.rejects)} rows: {self.pairs} pairs, {len(self.rejects)} rejected",
            f"split:      {self.train} training pairs, {self.held_out} held out",
            f"clusters:   {len(self.clusters)}",
        ]
        for c in self.clusters:
            lines.append(
                f"  cluster {c['cluster']}: {c['pairs']} pairs  chosen has more: {', '.join(c['chosen_more']) or '-'}"
                f"  rejected has more: {', '.join(c['rejected_more']) or '-'}"
            )
        lines.append(f"drafts:     {len(self.drafts)} asked, {parsed} parsed, {len(self.drafts) - parsed} unparsed")
        for d in self.drafts:
            shown = d["question"] or f"unparsed ({d['why']}): {d['text'][:60]!r}"
            lines.append(f"  cluster {d['cluster']}: {shown}")
        kept_ids = {id(c): pid for pid, c in self.kept}
        lines.append(f"candidates: {len(self.candidates)} scored on {self.held_out} held-out pairs (best first)")
        lines.append(f"  {'kept as':<11}{'accuracy':>9}  {'95% interval':<14}{'p(chosen)':>10}  {'source':<20}question")
        for c in self.candidates:
            lo, hi = c.interval
            src = {
                "draft": f"cluster {c.source.get('cluster')}",
                "contrast": f"measured {c.source.get('feature')}",
            }.get(c.source["kind"], "candidates")
            p = "n/a" if c.mean_p_chosen is None else f"{c.mean_p_chosen:.3f}"
            q = c.question if len(c.question) <= 70 else c.question[:67] + "..."
            lines.append(
                f"  {kept_ids.get(id(c), '-'):<11}{c.accuracy:>9.3f}  [{lo:.2f}, {hi:.2f}]  {p:>10}  {src:<20}{q}"
            )
        s = self.summary
        lines.append(
            f"wrote:      {self.output} ({s['name']} {s['version']}, {s['principles']} principles, "
            f"sha256:{s['sha256'][:16]})"
        )
        lines.append(f"candidates: {candidates_path(self.output)}")
        counts = ", ".join(f"{n} {r}" for r, n in reasons_count(self.rejects).items()) or "none"
        lines.append(f"rejects:    {rejects_path(self.output)} ({counts})")
        return lines


def derive(
    prefs: str | Path,
    output: str | Path,
    *,
    engine=None,
    backend: str = "hf",
    model: str = "smollm2",
    dtype: str = "float32",
    candidates: str | Path | None = None,
    held_out: float = 0.3,
    clusters: int = 4,
    k: int = 5,
    examples: int = 3,
    draft_tokens: int = 32,
    min_accuracy: float = 0.5,
    min_contrast: float = 0.75,
    seed: int = 0,
    name: str = DEFAULT_NAME,
    version: str = "1.0.0",
    description: str = DEFAULT_DESCRIPTION,
) -> Derived:
    """Raises DeriveError (and writes nothing) on unusable input or when no candidate is kept.
    ``engine``: an engine to use instead of loading ``backend``/``model`` (tests share one)."""
    for flag, value, least in (("--clusters", clusters, 0), ("--k", k, 1), ("--examples", examples, 1)):
        if value < least:
            raise DeriveError(f"{flag} must be at least {least}, got {value}")
    if draft_tokens < 1:
        raise DeriveError(f"--draft-tokens must be at least 1, got {draft_tokens}")
    if not 0 < held_out < 1:
        raise DeriveError(f"--held-out is a fraction of the pairs, between 0 and 1 (exclusive); got {held_out}")
    if min_contrast <= 0.5:
        raise DeriveError(f"--min-contrast is a share of pairs above 0.5 (above 1: off); got {min_contrast}")
    if not 0 <= min_accuracy < 1:
        raise DeriveError(f"--min-accuracy is an accuracy in [0, 1); got {min_accuracy}")
    if clusters == 0 and candidates is None:
        raise DeriveError("--clusters 0 drafts nothing: give --candidates")
    output = Path(output)
    file_entries = read_candidates(candidates) if candidates is not None else []
    try:
        pairs, rejects = read_pairs(str(prefs))
    except RowsError as e:
        raise DeriveError(str(e)) from None
    try:
        train_ids, held_ids = split_held_out([p.id for p in pairs], held_out, seed)
    except ValueError as e:
        raise DeriveError(f"{prefs}: {e}") from None
    by_id = {p.id: p for p in pairs}
    train = [by_id[i] for i in train_ids]
    held = [by_id[i] for i in held_ids]

    if engine is None:
        from cai_ray.config.sections import EngineConfig
        from cai_ray.engine import engine_from_section

        engine = engine_from_section(EngineConfig(backend=backend, model=model, dtype=dtype))

    # measured contrasts (no model): candidates themselves, and hints for the drafts
    found_contrasts = (
        contrasts([p.chosen for p in train], [p.rejected for p in train], min_contrast) if min_contrast <= 1 else []
    )
    hints = [c.describe() for c in found_contrasts]

    # cluster and draft
    cluster_rows, drafts = [], []
    if clusters:
        x, vocab = difference_features(train)
        found: Clusters = cluster_pairs(x, clusters, seed)
        convs = []
        for j in range(found.k):
            members = found.members(j)
            more, less = top_words(found.centres[j], vocab)
            # the examples shown: the members nearest the cluster's centre, most typical first
            dist = ((x[members] - found.centres[j]) ** 2).sum(1)
            shown = [members[i] for i in sorted(range(len(members)), key=lambda i: (dist[i], i))[:examples]]
            cluster_rows.append(
                {
                    "cluster": j,
                    "pairs": len(members),
                    "chosen_more": more,
                    "rejected_more": less,
                    "example_ids": [train[i].id for i in shown],
                }
            )
            convs.append(draft_messages([train[i] for i in shown], more, less, hints))
        texts = engine.generate(convs, Sampling(temperature=0.0, top_p=1.0, max_new_tokens=draft_tokens, seed=seed))
        for row, text in zip(cluster_rows, texts):
            q, why = parse_draft(text)
            drafts.append({"cluster": row["cluster"], "text": draft_text(text), "question": q, "why": why})

    entries = [
        (d["question"], {"kind": "draft", "cluster": d["cluster"], "pair_ids": row["example_ids"], "draft": d["text"]})
        for d, row in zip(drafts, cluster_rows)
        if d["question"]
    ]
    entries += [
        (c.question, {"kind": "contrast", "feature": c.feature, "direction": c.direction, "share": c.share})
        for c in found_contrasts
    ]
    entries += file_entries
    if not entries:
        raise DeriveError(
            f"no candidate principles: none of the {len(drafts)} drafts parsed "
            f"({'; '.join(d['why'] for d in drafts)}); nothing written. Give --candidates, or another --model"
        )
    pooled = pool(entries)
    for c in pooled:
        score(engine, c, held, seed)
    ranked = sorted(pooled, key=lambda c: c.rank_key())
    good = [c for c in ranked if c.accuracy > min_accuracy][:k]
    if not good:
        best = ranked[0]
        raise DeriveError(
            f"no candidate reconstructs more than --min-accuracy {min_accuracy} of the {len(held)} held-out "
            f"pairs; nothing written (best: {best.question!r}, accuracy {best.accuracy:.3f})"
        )
    kept = [(f"derived-{i}", c) for i, c in enumerate(good, 1)]
    kept_as = {id(c): pid for pid, c in kept}

    principles = [
        {
            "id": pid,
            "category": CATEGORY,
            "weight": max(round(c.accuracy, 4), 0.0001),  # drawn more often the better it reconstructs
            **principle_texts(c.question),
            "provenance": {
                k: v for k, v in candidate_record(c, None, None).items() if k not in ("question", "kept_as", "rank")
            },
        }
        for pid, c in kept
    ]
    model_name = getattr(engine, "model_name", model)
    doc = {
        "name": name,
        "version": version,
        "description": description,
        "provenance": {
            "method": (
                "Inverse Constitutional AI: candidates drafted per cluster of training pairs (and/or "
                "given), each scored by the labeler using it alone on held-out pairs"
            ),
            "sources": {
                "prefs": str(prefs),
                "prefs_sha256": sha256_of(prefs),
                **({"candidates": str(candidates), "candidates_sha256": sha256_of(candidates)} if candidates else {}),
            },
            "engine": {"backend": backend, "model": model_name, "dtype": dtype},
            "settings": {
                "held_out": held_out,
                "clusters": clusters,
                "k": k,
                "examples": examples,
                "draft_tokens": draft_tokens,
                "min_accuracy": min_accuracy,
                "min_contrast": min_contrast,
                "seed": seed,
                "accuracy": "share of held-out pairs with debiased p(chosen) > 0.5; ci: Wilson 95%",
            },
            "pairs": {
                "read": len(pairs) + len(rejects),
                "used": len(pairs),
                "train": len(train),
                "held_out": len(held),
            },
            "clusters": cluster_rows,
            "drafts": {"asked": len(drafts), "parsed": sum(1 for d in drafts if d["question"])},
            "contrasts": [c.__dict__ for c in found_contrasts],
            "candidates": {
                "scored": len(pooled),
                "from_drafts": sum(1 for c in pooled if c.source["kind"] == "draft"),
                "from_contrasts": sum(1 for c in pooled if c.source["kind"] == "contrast"),
                "from_file": sum(1 for c in pooled if c.source["kind"] == "candidates"),
                "repeats_merged": len(entries) - len(pooled),
                "file": candidates_path(output).name,
            },
            "rejects": {"rows": len(rejects), "by_reason": reasons_count(rejects), "file": rejects_path(output).name},
        },
        "principles": principles,
        "examples": {"critique_revision": [], "comparison": []},
    }
    header = (
        f"# Derived by `cai-ray constitution derive` from {prefs}.\n"
        "# Each principle is a comparison question with which the AI labeler, using it alone,\n"
        "# reconstructs the preferences of held-out pairs; `provenance` holds its accuracy, its\n"
        "# 95% interval and where it came from. Read them before training on them.\n"
    )
    text = header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)
    rows = [candidate_record(c, r, kept_as.get(id(c))) for r, c in enumerate(ranked, 1)]
    rows += [
        {"question": None, "kept_as": None, "rank": None, "unparsed": d["why"], "source": {"kind": "draft", **d}}
        for d in drafts
        if not d["question"]
    ]
    summary = write_outputs(output, text, rejects, rows)
    return Derived(
        pairs=len(pairs),
        rejects=rejects,
        train=len(train),
        held_out=len(held),
        clusters=cluster_rows,
        drafts=drafts,
        candidates=ranked,
        kept=kept,
        output=output,
        summary=summary,
    )
