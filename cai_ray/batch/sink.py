"""The stages' Ray Data sink (kept apart so importing cai_ray.batch.stage needs no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import Datasink

from cai_ray.batch.stage import _atomic_parquet, _part_name, reject_records
from cai_ray.batch.storage import Store


class StageDatasink(Datasink):
    """Rows with a reject_reason → _rejects/part-*.jsonl; rows with a ``filter_column``
    value → filtered/part-*.parquet; the rest → data/part-*.parquet.

    A part's name is a hash of the ids in its block and it is written to a temp name and renamed,
    so a retried write task overwrites the same file instead of duplicating rows, and a
    crash never leaves a half-written part that resume would trust.
    """

    def __init__(self, out_dir: str, rows_per_file: int, columns: list[str], filter_column: str | None = None):
        self.out = Store(out_dir)
        self.rows_per_file = rows_per_file
        self.columns = columns
        self.filter_column = filter_column

    @property
    def min_rows_per_write(self):
        return self.rows_per_file

    def write(self, blocks, ctx) -> None:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="permissive")
        bad_mask = pc.is_valid(table["reject_reason"])
        good, bad = table.filter(pc.invert(bad_mask)), table.filter(bad_mask)
        if bad.num_rows:
            recs = reject_records(bad)
            name = _part_name([(r["source"], r["line"]) for r in recs]) + ".jsonl"
            self.out.write_jsonl(f"_rejects/{name}", recs)
        if self.filter_column and good.num_rows:
            # both halves of a block share one part name and record the other's size, so a
            # resume can tell a half-written block (drop_orphan_parts) from a whole one
            name = _part_name(good["id"].to_pylist())
            held = pc.is_valid(good[self.filter_column])
            filtered, good = good.filter(held), good.filter(pc.invert(held))
            for part, other, folder in ((filtered, good, "filtered"), (good, filtered, "data")):
                if part.num_rows:
                    _atomic_parquet(
                        part.select(self.columns), self.out, folder, [], name=name, sibling_rows=other.num_rows
                    )
        elif good.num_rows:
            _atomic_parquet(good.select(self.columns), self.out, "data", good["id"].to_pylist())
