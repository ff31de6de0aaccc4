"""The column contract: every row schema passed between stages, in one place.

    read   → PROMPT_SCHEMA   (id, source, line, prompt, prompt_messages, meta, reject_reason, raw)
    sl     → SL_SCHEMA       (PROMPT columns + init_response, steps, revision, messages,
                              chosen, rejected)
    write  → SL_OUTPUT_COLUMNS to data/*.parquet; rows with reject_reason to rejects.jsonl

    read   → PROMPT_SCHEMA
    pairs  → PAIR_SCHEMA     (one row per pair: id = pair id, prompt_id = input id,
                              response_a, response_b, policy)
    label  → LABEL_SCHEMA    (PAIR columns + p_a, p_ab, p_ba, principles, chosen/rejected,
                              filter_reason)
    write  → LABEL_OUTPUT_COLUMNS to data/ (kept) or filtered/ (filter_reason set)

A row whose ``reject_reason`` is set flows through the stages untouched and is written to
the rejects file with its source file, line and reason, so ``written + rejected = read``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
STEP = pa.struct([("principle_id", pa.string()), ("critique", pa.string()), ("revision", pa.string())])

PROMPT_FIELDS = [
    pa.field("id", pa.string()),  # null only on rejects that have no usable content
    pa.field("source", pa.string()),  # file the row came from
    pa.field("line", pa.int64()),  # JSONL/CSV: line number; Parquet/Arrow: 1-based row number
    pa.field("prompt", pa.string()),  # text of the last user turn
    pa.field("prompt_messages", MESSAGES),  # the conversation the model answers
    pa.field("meta", pa.string()),  # the row's other fields, as JSON (e.g. category)
    pa.field("reject_reason", pa.string()),  # null = good row
    pa.field("raw", pa.string()),  # rejects only: the offending input, truncated
]
PROMPT_SCHEMA = pa.schema(PROMPT_FIELDS)

SL_FIELDS = PROMPT_FIELDS + [
    pa.field("init_response", pa.string()),
    pa.field("steps", pa.list_(STEP)),  # one per revision round: principle, critique, revision
    pa.field("revision", pa.string()),  # the final revision
    pa.field("messages", MESSAGES),  # prompt_messages + final revision: the SFT row
    pa.field("chosen", MESSAGES),  # = messages
    pa.field("rejected", MESSAGES),  # prompt_messages + initial answer
]
SL_SCHEMA = pa.schema(SL_FIELDS)

# What lands in data/*.parquet: reject bookkeeping dropped, and prompt_messages too, since
# it is messages[:-1] (the output already repeats the prompt in messages/chosen/rejected).
SL_OUTPUT_COLUMNS = [f.name for f in SL_FIELDS if f.name not in ("reject_reason", "raw", "prompt_messages")]

PAIR_FIELDS = PROMPT_FIELDS + [
    pa.field("prompt_id", pa.string()),  # the input row's id (resume and accounting key)
    pa.field("response_a", pa.string()),
    pa.field("response_b", pa.string()),
    pa.field("policy", pa.string()),  # model that sampled the answers; null for given pairs
    pa.field("prompt_pairs", pa.int32()),  # how many pairs its prompt has: resume checks them all written
]
PAIR_SCHEMA = pa.schema(PAIR_FIELDS)

LABEL_FIELDS = PAIR_FIELDS + [
    pa.field("p_a", pa.float64()),  # final soft label: P(response_a is better)
    pa.field("p_ab", pa.float64()),  # P(response_a) shown as option (A), mean over principles
    pa.field("p_ba", pa.float64()),  # P(response_a) shown as option (B); null = one order only
    pa.field("position_consistent", pa.bool_()),  # both orders prefer the same response
    pa.field("principle_ids", pa.list_(pa.string())),  # the ensemble, one per comparison pair
    pa.field("p_ab_by_principle", pa.list_(pa.float64())),
    pa.field("p_ba_by_principle", pa.list_(pa.float64())),
    pa.field("reasoning", pa.list_(pa.string())),  # CoT only: per principle, AB then BA
    pa.field("chosen", MESSAGES),  # TRL preference format: prompt + preferred response
    pa.field("rejected", MESSAGES),
    pa.field("p_chosen", pa.float64()),  # max(p_a, 1 - p_a)
    pa.field("labeler", pa.string()),
    pa.field("template_sha256", pa.string()),
    pa.field("constitution", pa.string()),  # name@sha256[:12] of the constitution that labelled it
    pa.field("filter_reason", pa.string()),  # null = kept (data/); else filtered/ with why
]
LABEL_SCHEMA = pa.schema(LABEL_FIELDS)
LABEL_OUTPUT_COLUMNS = [f.name for f in LABEL_FIELDS if f.name not in ("reject_reason", "raw")]

REJECT_KEYS = ("source", "line", "id", "reason", "raw")
RAW_LIMIT = 2000  # characters of the offending input kept in rejects.jsonl


def append_message(convs: pa.Array, role: str, texts: list, valid: list[bool]) -> pa.Array:
    """Each conversation in ``convs`` (MESSAGES) plus one message {role, text}, built in
    Arrow without turning conversations into Python objects. Rows where ``valid`` is
    False come out null."""
    import numpy as np

    convs = convs.combine_chunks() if isinstance(convs, pa.ChunkedArray) else convs
    n = len(convs)
    offsets = convs.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = offsets - offsets[0]
    values = convs.values.slice(int(convs.offsets[0].as_py()), int(offsets[-1]))
    extra = pa.StructArray.from_arrays(
        [pa.array([role] * n, pa.string()), pa.array(texts, pa.string())], fields=list(MESSAGE)
    )
    lengths = np.diff(offsets)
    new_offsets = np.concatenate([[0], np.cumsum(lengths + 1)])
    # position of every output element in concat(values, extra)
    take = np.empty(int(new_offsets[-1]), dtype=np.int64)
    row_of = np.repeat(np.arange(n), lengths)
    within = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    take[new_offsets[:-1][row_of] + within] = np.arange(len(values))
    take[new_offsets[1:] - 1] = len(values) + np.arange(n)
    merged = pa.concat_arrays([values, extra]).take(pa.array(take))
    mask = pa.array([not v for v in valid], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(new_offsets, pa.int32()), merged, type=MESSAGES, mask=mask)


def reasons_count(rejects: list[dict[str, Any]]) -> dict[str, int]:
    """Rejects counted by the kind of reason (the text before any detail)."""
    return dict(Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejects))
