"""Read statements and votes in the layout of Polis's public data exports.

Input files (csv module; header names in any case, spaces or underscores for hyphens, a
UTF-8 BOM, and extra columns are all fine):

    comments.csv            comment-id, comment-body [, moderated: -1 = moderated out]
    votes.csv               voter-id, comment-id, vote (1 agree, -1 disagree, 0 pass)
                            [, timestamp]
    or participants-votes.csv   participant, then one column per comment id holding that
                            participant's vote (empty: no vote); the other columns
                            (xid, group-id, n-votes, ...) are ignored

Output: a ``PolisExport`` — the statements, each voter's *last* vote on each statement, and
every rejected row with its reason. A voter may vote on a statement again (Polis exports keep
both rows): the later one wins, by the timestamp column where there is one, else by file order.
One bad row is a reject, never an exception; a file without the columns needed is a
``CollectError`` naming the file and the columns it has.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

VOTE_VALUES = {1: "agree", -1: "disagree", 0: "pass"}
# participants-votes.csv columns that are not statements (Polis writes them before the votes)
PARTICIPANT_META = {"participant", "xid", "group-id", "n-comments", "n-votes", "n-agree", "n-disagree"}


class CollectError(ValueError):
    """An input or a result that `constitution collect` cannot turn into a constitution."""


@dataclass(frozen=True)
class Reject:
    file: str
    line: int  # the row's line in the file (the header is line 1)
    reason: str  # a short code, counted in the summary: "unknown comment-id", "bad vote", ...
    detail: str
    row: dict[str, str | None]


@dataclass
class PolisExport:
    statements: dict[str, str]  # comment id → text, in file order; moderated-out ones left out
    votes: dict[tuple[str, str], int]  # (voter id, comment id) → the voter's last vote: 1, -1, 0
    voters: list[str]  # in order of first vote
    layout: str  # "votes" or "participants-votes"
    rejects: list[Reject] = field(default_factory=list)
    moderated_out: list[str] = field(default_factory=list)
    vote_rows: int = 0  # votes read (rows, or filled cells of participants-votes.csv)
    revotes: int = 0  # earlier votes replaced by the same voter's later vote on that statement
    on_moderated_out: int = 0  # votes on moderated-out statements, not used

    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejects).most_common())


def _key(name: str | None) -> str:
    """'Comment ID', 'comment_id', ' comment-id ' → 'comment-id'."""
    return re.sub(r"[\s_]+", "-", (name or "").strip().lower())


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
    """Header keys and (line, row) pairs, keys normalised, values stripped; a short row's
    missing cells are None, a long row's extra cells are dropped."""
    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise CollectError(f"{path}: file not found") from None
    with f:
        reader = csv.reader(f)
        try:
            header = [_key(h) for h in next(reader)]
        except StopIteration:
            raise CollectError(f"{path}: empty file") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise CollectError(f"{path}: not a UTF-8 CSV file ({e})") from None
        rows = []
        try:
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue  # blank line
                row = {k: (cells[i].strip() if i < len(cells) else None) for i, k in enumerate(header)}
                rows.append((reader.line_num, row))
        except (UnicodeDecodeError, csv.Error) as e:
            raise CollectError(f"{path}: unreadable at line {reader.line_num + 1} ({e})") from None
    return header, rows


def _require(path: Path, header: list[str], needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise CollectError(
            f"{path}: no column {', '.join(repr(c) for c in missing)} for {what} "
            f"(columns: {', '.join(header) or 'none'})"
        )


def _vote(text: str | None) -> int | None:
    """'1', '-1', '0' (or '1.0' and the like) → the vote; anything else → None."""
    try:
        v = float(text or "")
    except ValueError:
        return None
    return int(v) if v in VOTE_VALUES else None


def read_statements(path: Path) -> tuple[dict[str, str], list[str], list[Reject]]:
    """comments.csv → ({comment id: text}, moderated-out ids, rejects)."""
    header, rows = _rows(path)
    _require(path, header, ("comment-id", "comment-body"), "statements")
    statements: dict[str, str] = {}
    first_line: dict[str, int] = {}
    moderated_out: list[str] = []
    rejects: list[Reject] = []
    for line, row in rows:
        cid, body = row.get("comment-id") or "", " ".join((row.get("comment-body") or "").split())
        if not cid:
            rejects.append(Reject(str(path), line, "missing comment-id", "", row))
        elif cid in first_line:
            rejects.append(Reject(str(path), line, "duplicate comment-id", f"first on line {first_line[cid]}", row))
        elif not body:
            rejects.append(Reject(str(path), line, "empty comment-body", "", row))
        elif row.get("moderated") == "-1":
            # Polis's moderators hid it from voters; its votes are not a public judgement
            first_line[cid] = line
            moderated_out.append(cid)
        else:
            first_line[cid] = line
            statements[cid] = body
    return statements, moderated_out, rejects


def read_export(statements_path: str | Path, votes_path: str | Path) -> PolisExport:
    statements_path, votes_path = Path(statements_path), Path(votes_path)
    statements, moderated_out, rejects = read_statements(statements_path)
    header, rows = _rows(votes_path)
    out = PolisExport(statements, {}, [], "votes", rejects, moderated_out)
    hidden = set(moderated_out)
    # (order, voter, comment, vote); order sorts re-votes: (timestamp, line) or (line,)
    accepted: list[tuple[tuple[float, ...], str, str, int]] = []

    def check(line: int, row: dict, voter: str | None, cid: str | None, raw: str | None) -> int | None:
        """The vote, or None after recording why it is not used."""
        out.vote_rows += 1
        v = _vote(raw)
        reason, detail = "", ""
        if not voter:
            reason = "missing voter-id"
        elif not cid:
            reason = "missing comment-id"
        elif cid in hidden:
            out.on_moderated_out += 1
            return None
        elif cid not in statements:
            reason, detail = "unknown comment-id", f"comment-id {cid!r} is not in {statements_path.name}"
        elif v is None:
            reason, detail = "bad vote", f"vote must be 1, -1 or 0, got {raw!r}"
        if reason:
            out.rejects.append(Reject(str(votes_path), line, reason, detail, row))
            return None
        return v

    if "vote" in header:
        _require(votes_path, header, ("voter-id", "comment-id"), "votes")
        timed = "timestamp" in header
        for line, row in rows:
            order: tuple[float, ...] = (line,)
            if timed:
                try:
                    order = (float(row.get("timestamp") or ""), line)
                except ValueError:
                    out.vote_rows += 1
                    detail = f"timestamp must be a number, got {row.get('timestamp')!r}"
                    out.rejects.append(Reject(str(votes_path), line, "bad timestamp", detail, row))
                    continue
            voter, cid = row.get("voter-id"), row.get("comment-id")
            v = check(line, row, voter, cid, row.get("vote"))
            if v is not None:
                accepted.append((order, voter, cid, v))
    elif "participant" in header:
        out.layout = "participants-votes"
        # a column is a statement if comments.csv names it, or if it is a number (Polis's ids
        # are): a numbered column that comments.csv lacks makes its votes "unknown comment-id"
        columns = [c for c in header if c not in PARTICIPANT_META and (c in statements or c in hidden or c.isdigit())]
        for line, row in rows:
            voter = row.get("participant")
            for cid in columns:
                raw = row.get(cid)
                if raw:  # empty cell: no vote
                    v = check(line, {"participant": voter or "", cid: raw}, voter, cid, raw)
                    if v is not None:
                        accepted.append(((line,), voter, cid, v))
    else:
        raise CollectError(
            f"{votes_path}: neither a votes.csv (voter-id, comment-id, vote) nor a participants-votes.csv "
            f"(participant, one column per comment id) (columns: {', '.join(header) or 'none'})"
        )

    seen_voters: dict[str, None] = {}
    for _, voter, cid, v in sorted(accepted, key=lambda a: a[0]):
        if (voter, cid) in out.votes:
            out.revotes += 1
        out.votes[(voter, cid)] = v
    for _, voter, _, _ in accepted:  # voters in file order, not re-vote order
        seen_voters.setdefault(voter)
    out.voters = list(seen_voters)
    return out
