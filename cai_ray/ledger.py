"""Row accounting and exactly-once bookkeeping for a batch job, shared by its stages.

One small actor per job run. Every read row passes ``claim`` once (read tasks are fused with
it), which decides: a new id to process, an id already in the output from an earlier run
(resume: skipped), or a duplicate of an id seen at another file/line (rejected). Engine
actors report their token and time figures here, so the driver can write them to the
manifest without a second pass over the data.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class Ledger:
    def __init__(self, done_ids: list[str]):
        self.done = set(done_ids)
        self.owner: dict[str, tuple[str, int]] = {}
        self.seen: set[tuple[str, int]] = set()
        self.counts: Counter = Counter()
        self.engine: Counter = Counter()

    def claim(self, ids: list[str | None], sources: list[str], lines: list[int]) -> list[str]:
        """'new' | 'done' | 'reject' (invalid row) | 'duplicate <source>:<line>' per row.

        Idempotent for the same (source, line): a retried read task claims again and gets
        the same answer, so retries never turn a row into its own duplicate.
        """
        out = []
        for rid, src, line in zip(ids, sources, lines):
            key = (src, line)
            if rid is None:
                status = "reject"
            else:
                first = self.owner.setdefault(rid, key)
                if first != key:
                    status = f"duplicate {first[0]}:{first[1]}"
                else:
                    status = "done" if rid in self.done else "new"
            if key not in self.seen:  # count each input row once, retries included
                self.seen.add(key)
                self.counts["read"] += 1
                self.counts[status.split()[0]] += 1
            out.append(status)
        return out

    def add_engine_stats(self, **stats: float) -> None:
        self.engine.update(stats)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def report(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "engine": dict(self.engine)}
