"""Answer pairs for RL-CAI labels: ready-made from the input, or sampled from a policy.

    PROMPT_SCHEMA ─► to_pair_rows (task) ─► PairSampler (policy actor pool) ─► PAIR_SCHEMA
                     given pairs: id = input id        sampled: k answers, deduplicated,
                     prompts: responses left null      pairs "all" or "disjoint",
                                                       id = "<input id>/<i>-<j>"

``prompt_id`` always holds the input row's id: it is what resume skips and what the row
accounting counts. A row the stage cannot use becomes a reject with its reason.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa

from cai_ray.batch.readers import bad_text
from cai_ray.batch.records import PAIR_SCHEMA
from cai_ray.batch.stage import engine_threads
from cai_ray.core.context import context_overflow
from cai_ray.core.seeds import batch_seed
from cai_ray.engine import load_engine

PAIR_KEYS = ("response_a", "response_b")
SAMPLED_ID = re.compile(r".+/\d+-\d+$")  # "<prompt id>/<i>-<j>": the id of a sampled pair


def given_pair(meta: dict[str, Any], max_chars: int) -> tuple[tuple[str, str] | None, str | None]:
    """(response_a, response_b) from a row's extra fields, None if it has neither, or a reason."""
    present = [k for k in PAIR_KEYS if k in meta]
    if not present:
        return None, None
    if len(present) == 1:
        missing = "response_b" if present[0] == "response_a" else "response_a"
        return None, f"row has {present[0]} but no {missing}"
    a, b = meta["response_a"], meta["response_b"]
    for key, value in (("response_a", a), ("response_b", b)):
        if not isinstance(value, str):
            return None, f"field {key!r} must be a string, got {type(value).__name__}"
        if not value.strip():
            return None, f"empty {key}"
        if len(value) > max_chars:
            return None, f"{key} too long: {len(value)} characters > inputs.max_prompt_chars={max_chars}"
        if bad_text(value):
            return None, f"{key}: {bad_text(value)}"
    if a.strip() == b.strip():
        return None, "response_a and response_b are identical: nothing to compare"
    return (a, b), None


def to_pair_rows(batch: pa.Table, max_chars: int, can_sample: bool) -> pa.Table:
    """PROMPT_SCHEMA → PAIR_SCHEMA, one row per input row. Ready-made pairs move from
    ``meta`` to their columns; prompts keep null responses for the policy to fill."""
    reasons = batch["reject_reason"].to_pylist()
    metas = batch["meta"].to_pylist()
    ids = batch["id"].to_pylist()
    resp_a: list[str | None] = [None] * batch.num_rows
    resp_b: list[str | None] = [None] * batch.num_rows
    for i, raw in enumerate(metas):
        if reasons[i] is not None:
            continue
        meta = json.loads(raw) if raw else {}
        pair, reason = given_pair(meta, max_chars)
        if reason is None and pair is None and not can_sample:
            reason = "row has no response_a/response_b and no policy model is set to sample answers (--policy)"
        if reason is not None:
            reasons[i] = reason
            continue
        if pair is not None and SAMPLED_ID.match(ids[i]):
            reasons[i] = (
                f"id {ids[i]!r} has the form '<prompt id>/<i>-<j>' of a sampled pair's id and could collide "
                "with the pairs sampled for another prompt: rename it"
            )
            continue
        if pair is not None:
            resp_a[i], resp_b[i] = pair
            rest = {k: v for k, v in meta.items() if k not in PAIR_KEYS}
            metas[i] = json.dumps(rest, ensure_ascii=False) if rest else None
    cols = {name: batch[name] for name in batch.schema.names}
    cols.update(
        reject_reason=pa.array(reasons, pa.string()),
        meta=pa.array(metas, pa.string()),
        prompt_id=batch["id"],
        response_a=pa.array(resp_a, pa.string()),
        response_b=pa.array(resp_b, pa.string()),
        policy=pa.nulls(batch.num_rows, pa.string()),
        prompt_pairs=pa.array([1] * batch.num_rows, pa.int32()),  # the sampler sets its own
    )
    return pa.table([cols[n] for n in PAIR_SCHEMA.names], schema=PAIR_SCHEMA)


def distinct_answers(answers: list[str]) -> list[str]:
    """Identical answers (after trimming whitespace) kept once, first occurrence first."""
    seen: set[str] = set()
    out = []
    for a in answers:
        key = a.strip()
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


def make_pairs(n: int, pairing: str) -> list[tuple[int, int]]:
    """Index pairs over ``n`` distinct answers: every pair, or disjoint neighbours."""
    if pairing == "all":
        return list(itertools.combinations(range(n), 2))
    if pairing == "disjoint":
        return [(i, i + 1) for i in range(0, n - 1, 2)]
    raise ValueError(f"pairing must be all or disjoint, got {pairing!r}")


class PairSampler:
    """Policy actor: k answers for each prompt row without a pair; explodes into pairs."""

    def __init__(
        self,
        backend: str,
        engine_kwargs: dict[str, Any],
        samples: int,
        pairing: str,
        sampling: dict[str, Any],
        seed: int,
        ledger=None,
        max_actors: int = 1,
    ):
        start = time.perf_counter()
        self.engine = load_engine(backend, **engine_threads(backend, engine_kwargs, max_actors))
        self.samples, self.pairing, self.sampling, self.seed = samples, pairing, sampling, seed
        self.ledger = ledger
        if ledger is not None:
            ledger.add_engine_stats.remote(model_load_s=time.perf_counter() - start, actors_started=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        reasons = batch["reject_reason"].to_pylist()
        ids = batch["id"].to_pylist()
        given_a = batch["response_a"].to_pylist()
        given_b = batch["response_b"].to_pylist()
        todo = [i for i in range(batch.num_rows) if reasons[i] is None and given_a[i] is None]
        convs = batch["prompt_messages"].to_pylist() if todo else []
        budget, ctx = self.sampling.max_new_tokens, self.engine.context_length
        for i, n in zip(todo, self.engine.token_counts([convs[i] for i in todo])):
            reasons[i] = context_overflow("the policy", n, budget, ctx)
        todo = [i for i in todo if reasons[i] is None]
        answers: dict[int, list[str]] = {}
        tokens_before = getattr(self.engine, "tokens_generated", 0)
        if todo:
            k = self.samples
            params = replace(self.sampling, seed=batch_seed(self.seed, [ids[i] for i in todo], "pairs"))
            texts = self.engine.generate([convs[i] for i in todo for _ in range(k)], params)
            for j, i in enumerate(todo):
                answers[i] = distinct_answers(texts[j * k : (j + 1) * k])
                if len(answers[i]) < 2:
                    reasons[i] = f"the policy gave fewer than 2 distinct answers in {k} samples"

        # explode: one output row per pair (or the input row itself: given pair or reject)
        take, pair_ids, resp_a, resp_b, policy, counts = [], [], [], [], [], []
        for i in range(batch.num_rows):
            if reasons[i] is None and i in answers:
                distinct = answers[i]
                pairs = make_pairs(len(distinct), self.pairing)
                for x, y in pairs:
                    take.append(i)
                    pair_ids.append(f"{ids[i]}/{x}-{y}")
                    resp_a.append(distinct[x])
                    resp_b.append(distinct[y])
                    policy.append(self.engine.model_name)
                    counts.append(len(pairs))
            else:
                take.append(i)
                pair_ids.append(ids[i])
                resp_a.append(given_a[i])
                resp_b.append(given_b[i])
                policy.append(None)
                counts.append(1)
        out = batch.set_column(
            batch.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reasons, pa.string())
        ).take(pa.array(take, pa.int64()))
        for name, values in (("id", pair_ids), ("response_a", resp_a), ("response_b", resp_b), ("policy", policy)):
            out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, pa.string()))
        out = out.set_column(out.schema.get_field_index("prompt_pairs"), "prompt_pairs", pa.array(counts, pa.int32()))
        if self.ledger is not None:
            self.ledger.add_engine_stats.remote(
                engine_s=time.perf_counter() - t0,
                policy_s=time.perf_counter() - t0,
                tokens=getattr(self.engine, "tokens_generated", 0) - tokens_before,
            )
        return out
