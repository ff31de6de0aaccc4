"""Row accounting and exactly-once bookkeeping for a batch job, shared by its stages.

One small actor per job run. Every read block passes ``claim`` once (the claim runs fused
with the read task), which decides for each row: a new id to process, an id already in the
output from an earlier run (resume: skipped), or a duplicate of an id first seen at another
file/line (rejected). Engine actors report their token and time figures here, so the
driver writes them to the manifest without a second pass over the data.

Memory stays small at millions of rows: ids are kept as 64-bit hashes in sorted numpy
arrays (16 bytes a row with the owner's position), not as Python strings. Two different
ids that collide in 64 bits would be reported as a duplicate (in rejects.jsonl, with the
reason; never silently) — about a 3-in-a-million chance over ten million distinct ids.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

LINE_BITS = 40  # position = source index << 40 | line: 2^40 lines a file, 2^24 files
NEW, DONE, REJECT, DUPLICATE = 0, 1, 2, 3  # claim codes


def hash_ids(ids: list[str]) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False).astype(np.uint64)


class SortedMap:
    """uint64 → uint64, append-only, as a few sorted levels merged now and then (LSM)."""

    def __init__(self):
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.levels)

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = np.zeros(len(keys), dtype=bool)
        values = np.zeros(len(keys), dtype=np.uint64)
        for lk, lv in self.levels:
            idx = np.searchsorted(lk, keys)
            idx[idx == len(lk)] = 0
            hit = (lk[idx] == keys) & ~found if len(lk) else np.zeros(len(keys), bool)
            values[hit] = lv[idx[hit]]
            found |= hit
        return found, values

    def put(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert keys that are not present yet (the caller checks) and unique."""
        if len(keys) == 0:
            return
        order = np.argsort(keys, kind="stable")
        self.levels.append((keys[order], values[order]))
        if len(self.levels) > 8:  # merge: amortised O(n log n), keeps lookups cheap
            k = np.concatenate([lk for lk, _ in self.levels])
            v = np.concatenate([lv for _, lv in self.levels])
            order = np.argsort(k, kind="stable")
            self.levels = [(k[order], v[order])]


class Ledger:
    def __init__(self, done_ids):
        self.done = SortedMap()
        if len(done_ids):
            if hasattr(done_ids, "to_pylist"):  # Arrow, as the driver ships it
                done_ids = done_ids.to_pylist()
            h = np.unique(hash_ids(done_ids))
            self.done.put(h, np.zeros(len(h), np.uint64))
        self.owner = SortedMap()  # id hash → position of the row that claimed it first
        self.sources: list[str] = []
        self.source_index: dict[str, int] = {}
        self.other_rows: set[int] = set()  # positions of duplicate/invalid rows already counted
        self.counts: Counter = Counter()
        self.engine: Counter = Counter()

    def _source_index(self, source: str) -> int:
        idx = self.source_index.get(source)
        if idx is None:
            idx = self.source_index[source] = len(self.sources)
            self.sources.append(source)
        return idx

    def claim(self, ids, sources, lines) -> tuple[np.ndarray, dict[int, str]]:
        """Per row a code — NEW, DONE, REJECT (invalid row) or DUPLICATE — and, for
        duplicates, where the id was first seen ('<source>:<line>').

        ``ids``/``sources``/``lines`` may be lists or Arrow arrays (cheaper to ship).
        Idempotent for the same (source, line): a retried read task claims again and gets
        the same answer, and its rows are counted once.
        """
        ids = ids.to_numpy(zero_copy_only=False) if hasattr(ids, "to_numpy") else np.asarray(ids, dtype=object)
        lines = lines.to_numpy(zero_copy_only=False) if hasattr(lines, "to_numpy") else np.asarray(lines)
        sources = sources.to_pylist() if hasattr(sources, "to_pylist") else list(sources)
        n = len(ids)
        distinct = set(sources)
        if len(distinct) == 1:  # the usual case: a read block comes from one file
            src_idx = np.full(n, self._source_index(sources[0]), dtype=np.uint64)
        else:
            src_idx = np.fromiter((self._source_index(x) for x in sources), np.uint64, n)
        pos = (src_idx << np.uint64(LINE_BITS)) | lines.astype(np.uint64)
        codes = np.full(n, REJECT, dtype=np.int8)
        dups: dict[int, str] = {}

        invalid = np.fromiter((x is None for x in ids), bool, n)
        for p in pos[invalid].tolist():
            if p not in self.other_rows:
                self.other_rows.add(p)
                self.counts["read"] += 1
                self.counts["reject"] += 1
        vi = np.nonzero(~invalid)[0]
        if len(vi) == 0:
            return codes, dups
        h = hash_ids(ids[vi].tolist())
        vpos = pos[vi]
        found, owner = self.owner.get(h)
        # the first occurrence within this block claims an id; later ones are its duplicates
        uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        is_first = np.zeros(len(h), bool)
        is_first[first] = True
        new = ~found & is_first
        self.owner.put(h[new], vpos[new])
        owner = np.where(found, owner, vpos[first][inverse])
        in_done, _ = self.done.get(h)
        mine = owner == vpos
        codes[vi[mine]] = np.where(in_done[mine], DONE, NEW)
        counted = mine & new  # retries of already-claimed rows are not counted again
        self.counts["read"] += int(counted.sum())
        self.counts["done"] += int((counted & in_done).sum())
        self.counts["new"] += int((counted & ~in_done).sum())
        for j in np.nonzero(~mine)[0].tolist():
            i, o, p = int(vi[j]), int(owner[j]), int(vpos[j])
            codes[i] = DUPLICATE
            dups[i] = f"{self.sources[o >> LINE_BITS]}:{o & ((1 << LINE_BITS) - 1)}"
            if p not in self.other_rows:
                self.other_rows.add(p)
                self.counts["read"] += 1
                self.counts["duplicate"] += 1
        return codes, dups

    def add_engine_stats(self, **stats: float) -> None:
        self.engine.update(stats)

    def report(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "engine": dict(self.engine), "ids": len(self.owner)}
