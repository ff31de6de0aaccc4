"""`cai-ray constitution collect`: a Polis export → a constitution the public agreed with.

    read       polis.read_export: statements, each voter's last vote, rejects
    matrix     voters × statements (1/-1/0, a mask for the missing); voters with fewer than
               ``min_votes`` votes are left out of the groups and of the consensus
    groups     opinion_groups: PCA + k-means, k by silhouette over 2..max_groups
    consensus  consensus.select: P(agree) >= min_agree and >= min_group_votes votes in every group
    write      one principle per kept statement (id ``ccai-<comment id>``, category
               "collective", weight = consensus score) with its provenance; validated with
               ``load_constitution`` before it replaces FILE; rejects to FILE.rejects.jsonl

Nothing is written when no statement passes: a constitution without principles is an error.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from cai_ray.collective.consensus import Support, group_support, select
from cai_ray.collective.files import sha256_of, write_constitution, write_jsonl
from cai_ray.collective.opinion_groups import Groups, opinion_groups
from cai_ray.collective.polis import VOTE_VALUES, CollectError, PolisExport, read_export

CATEGORY = "collective"
DEFAULT_NAME = "collective"
DEFAULT_DESCRIPTION = (
    "Statements that every opinion group in a public vote agreed with, found by group-aware "
    "consensus over a Polis export and written as principles."
)


def principle_texts(statement: str) -> dict[str, str]:
    """The three requests for one public statement, in the style of constitutions/general.yaml."""
    quoted = f'"{statement}"'
    return {
        "critique_request": (
            "Identify ways the assistant's last reply conflicts with this principle, which the public "
            f"agreed with: {quoted} Point to the exact parts, or say plainly that there are none."
        ),
        "revision_request": (
            "Rewrite the assistant's reply so it is consistent with this principle, which the public "
            f"agreed with, while still helping with what was asked: {quoted}"
        ),
        "comparison_question": (
            f"Which reply is more consistent with this principle, which the public agreed with: {quoted}"
        ),
    }


def principle_id(comment_id: str, taken: set[str]) -> str:
    """``ccai-<comment id>`` made a valid principle id (lower case, other characters → '-');
    a suffix if two comment ids become the same id."""
    base = "ccai-" + (re.sub(r"[^a-z0-9_-]+", "-", comment_id.lower()).strip("-") or "statement")
    pid, n = base, 1
    while pid in taken:
        n += 1
        pid = f"{base}-{n}"
    taken.add(pid)
    return pid


def vote_matrix(export: PolisExport) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """→ (voter ids, statement ids, votes, mask), both arrays (voters, statements)."""
    voters, statements = export.voters, list(export.statements)
    vi = {v: i for i, v in enumerate(voters)}
    si = {s: j for j, s in enumerate(statements)}
    votes = np.zeros((len(voters), len(statements)), dtype=np.int8)
    mask = np.zeros_like(votes, dtype=bool)
    for (voter, cid), v in export.votes.items():
        votes[vi[voter], si[cid]] = v
        mask[vi[voter], si[cid]] = True
    return voters, statements, votes, mask


def _sig(x: float) -> float:
    """Four significant figures: a weight of 3e-7 stays positive (the validator needs > 0)."""
    return float(f"{float(x):.4g}")


def principle(pid: str, statement_id: str, text: str, support: Support, j: int) -> dict:
    """One kept statement (column ``j`` of ``support``) as a principle with its provenance."""
    groups = [
        {
            "group": g,
            "agree": int(support.agree[g, j]),
            "disagree": int(support.disagree[g, j]),
            "pass": int(support.passed[g, j]),
            "votes": int(support.votes[g, j]),
            "p_agree": round(float(support.p_agree[g, j]), 4),
        }
        for g in range(support.p_agree.shape[0])
    ]
    return {
        "id": pid,
        "category": CATEGORY,
        # drawn more often the more every group agreed; between two kept statements the
        # ratio is at most (1 / min_agree) ** groups
        "weight": _sig(support.consensus[j]),
        **principle_texts(text),
        "provenance": {
            "statement_id": statement_id,
            "statement": text,
            "consensus": _sig(support.consensus[j]),
            "groups": groups,
        },
    }


@dataclass
class Collected:
    """What the command prints: the groups, the kept statements, where the files went."""

    export: PolisExport
    statement_ids: list[str]
    clustered: int  # voters in the groups
    left_out: int  # voters with fewer than min_votes votes
    groups: Groups
    support: Support
    kept: list[int]  # statement indices, best consensus first
    principle_ids: list[str]
    output: Path
    rejects_path: Path
    summary: dict  # load_constitution(output).summary()

    def report(self) -> list[str]:
        e, g = self.export, self.groups
        lines = [
            f"read:      {len(e.statements)} statements, {len(e.voters)} voters, {len(e.votes)} votes "
            f"({e.layout} layout; re-votes replaced: {e.revotes}, statements moderated out: "
            f"{len(e.moderated_out)}, rows rejected: {len(e.rejects)})",
            f"clustered: {self.clustered} voters (left out with too few votes: {self.left_out})",
        ]
        tried = (
            ", ".join(f"k={k}: {s:.3f}" for k, s in g.silhouettes.items())
            or "not tried: --max-groups 1 or too few different voters"
        )
        sizes = np.bincount(g.labels, minlength=g.k)
        lines.append(f"groups:    {g.k} (silhouette {tried})")
        lines += [f"  group {j}: {n} voters" for j, n in enumerate(sizes)]
        lines.append(f"kept:      {len(self.kept)} of {len(e.statements)} statements (gN=P(agree)/votes in group N)")
        s = self.support
        for pid, j in zip(self.principle_ids, self.kept):
            per_group = "  ".join(f"g{g_}={s.p_agree[g_, j]:.2f}/{s.votes[g_, j]}" for g_ in range(g.k))
            text = e.statements[self.statement_ids[j]]
            text = text if len(text) <= 70 else text[:67] + "..."
            lines.append(f"  {pid:<16} consensus {s.consensus[j]:.3f}  {per_group}  {text}")
        c = self.summary
        lines.append(
            f"wrote:     {self.output} ({c['name']} {c['version']}, {c['principles']} principles, sha256:{c['sha256'][:16]})"
        )
        counts = ", ".join(f"{n} {r}" for r, n in e.reject_counts().items()) or "none"
        lines.append(f"rejects:   {self.rejects_path} ({counts})")
        return lines


def collect(
    statements: str | Path,
    votes: str | Path,
    output: str | Path,
    *,
    max_groups: int = 5,
    min_votes: int = 7,
    min_agree: float = 0.6,
    min_group_votes: int = 3,
    max_principles: int = 20,
    seed: int = 0,
    name: str = DEFAULT_NAME,
    version: str = "1.0.0",
    description: str = DEFAULT_DESCRIPTION,
) -> Collected:
    """Raises CollectError (and writes nothing) on unusable input or when nothing is kept."""
    for flag, value, least in (
        ("--max-groups", max_groups, 1),
        ("--min-votes", min_votes, 1),
        ("--min-group-votes", min_group_votes, 0),
        ("--max-principles", max_principles, 1),
    ):
        if value < least:
            raise CollectError(f"{flag} must be at least {least}, got {value}")
    if not 0 <= min_agree <= 1:
        raise CollectError(f"--min-agree is a probability, between 0 and 1; got {min_agree}")
    output = Path(output)
    rejects_path = output.with_name(output.name + ".rejects.jsonl")
    export = read_export(statements, votes)
    if not export.statements:
        raise CollectError(f"{statements}: no statements to vote on")

    voters, ids, matrix, mask = vote_matrix(export)
    per_voter = mask.sum(1)
    rows = per_voter >= min_votes
    if not rows.any():
        raise CollectError(
            f"{votes}: no voter has --min-votes {min_votes} votes "
            f"({len(voters)} voters, at most {int(per_voter.max(initial=0))} votes each)"
        )
    groups = opinion_groups(matrix[rows], mask[rows], max_groups=max_groups, seed=seed)
    support = group_support(matrix[rows], mask[rows], groups.labels, groups.k)
    kept = select(support, min_agree, min_group_votes, max_principles)
    if not kept:
        worst = support.p_agree.min(0)
        best = int(worst.argmax())
        raise CollectError(
            f"no statement has P(agree) >= --min-agree {min_agree} and >= --min-group-votes "
            f"{min_group_votes} votes in every one of the {groups.k} groups; nothing written "
            f"(closest: statement {ids[best]!r}, lowest group P(agree) {worst[best]:.2f}, "
            f"fewest group votes {int(support.votes[:, best].min())})"
        )

    taken: set[str] = set()
    pids = [principle_id(ids[j], taken) for j in kept]
    principles = [principle(pid, ids[j], export.statements[ids[j]], support, j) for pid, j in zip(pids, kept)]

    sizes = np.bincount(groups.labels, minlength=groups.k)
    doc = {
        "name": name,
        "version": version,
        "description": description,
        "provenance": {
            "method": "Polis group-aware consensus: PCA + k-means opinion groups, P(agree) in every group",
            "sources": {
                "statements": str(statements),
                "statements_sha256": sha256_of(statements),
                "votes": str(votes),
                "votes_sha256": sha256_of(votes),
                "layout": export.layout,
            },
            "thresholds": {
                "max_groups": max_groups,
                "min_votes": min_votes,
                "min_agree": min_agree,
                "min_group_votes": min_group_votes,
                "max_principles": max_principles,
                "seed": seed,
            },
            "voters": {"total": len(voters), "clustered": int(rows.sum()), "too_few_votes": int((~rows).sum())},
            "statements": {
                "read": len(export.statements),
                "moderated_out": len(export.moderated_out),
                "kept": len(kept),
            },
            "votes": {
                "rows": export.vote_rows,
                "used": len(export.votes),
                "revotes_replaced": export.revotes,
                "on_moderated_out": export.on_moderated_out,
                **{name_: int((mask & (matrix == v)).sum()) for v, name_ in VOTE_VALUES.items()},
            },
            "groups": [{"group": g, "voters": int(n)} for g, n in enumerate(sizes)],
            "silhouette": {int(k): float(s) for k, s in groups.silhouettes.items()},
            "rejects": {"rows": len(export.rejects), "by_reason": export.reject_counts(), "file": rejects_path.name},
        },
        "principles": principles,
        "examples": {"critique_revision": [], "comparison": []},
    }
    header = (
        f"# Collected by `cai-ray constitution collect` from {statements} and {votes}.\n"
        "# Each principle is a public statement that every opinion group agreed with (Polis's\n"
        "# group-aware consensus); `provenance` holds the statement and its support per group.\n"
        "# The statements are the public's words, unedited: read them before training on them.\n"
    )
    text = header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)

    summary = write_constitution(output, text, CollectError, "collected")
    write_jsonl(rejects_path, (asdict(r) for r in export.rejects))
    return Collected(
        export=export,
        statement_ids=ids,
        clustered=int(rows.sum()),
        left_out=int((~rows).sum()),
        groups=groups,
        support=support,
        kept=kept,
        principle_ids=pids,
        output=output,
        rejects_path=rejects_path,
        summary=summary,
    )
