"""The column contract: every row schema passed between stages, in one place.

    read   → PROMPT_SCHEMA   (id, source, line, prompt, prompt_messages, meta, reject_reason, raw)
    sl     → SL_SCHEMA       (PROMPT columns + init_response, steps, revision, messages,
                              chosen, rejected)
    write  → SL_OUTPUT_COLUMNS to data/*.parquet; rows with reject_reason to rejects.jsonl

A row whose ``reject_reason`` is set flows through the stages untouched and is written to
the rejects file with its source file, line and reason, so ``written + rejected = read``.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
STEP = pa.struct(
    [("principle_id", pa.string()), ("critique", pa.string()), ("revision", pa.string())]
)

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

# What lands in data/*.parquet (reject bookkeeping columns dropped).
SL_OUTPUT_COLUMNS = [f.name for f in SL_FIELDS if f.name not in ("reject_reason", "raw")]

REJECT_KEYS = ("source", "line", "id", "reason", "raw")
RAW_LIMIT = 2000  # characters of the offending input kept in rejects.jsonl


def empty_columns(schema: pa.Schema, n: int) -> dict[str, list]:
    return {name: [None] * n for name in schema.names}
