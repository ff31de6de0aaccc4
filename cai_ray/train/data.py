"""Training rows from the pipeline's outputs or user files, with every input row accounted for.

    SL-CAI folder / messages / prompt+completion ─► sft_row ─► {"prompt": [...], "completion": [...]}
    labeling folder / prompt+chosen+rejected     ─► pref_row ─► {"id", "prompt", "chosen", "rejected", "p_chosen"}

Every row has an id, by the one rule the batch readers use too (readers.given_id /
conversation_id): its own ``id`` (a non-empty string or an integer; anything else is a reject),
else a hash of its conversation(s) — the same prompt has the same id in every step, wherever
it sits in its file, and a held-out split by id keeps duplicates on one side.

A row that cannot be used is not dropped: it becomes a reject ``{source, line, id, reason,
raw}`` that the job writes to ``OUTPUT/rejects.jsonl`` and counts in the manifest. Rows longer
than ``optim.max_length`` tokens are rejects too: the trainers would otherwise truncate them
(SFT) or filter them out without a word (TRL's reward and DPO trainers). Once the tokenizer is
known, special-token markup in the contents is neutralised (``neutralise_rows``) before
lengths are counted: TRL's trainers would read it as real turns.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from cai_ray.batch.readers import Reject, Row, _messages
from cai_ray.batch.readers import RowsError as TrainDataError  # noqa: F401 - what the trainers raise and catch
from cai_ray.batch.records import RAW_LIMIT


def sft_row(r: Row) -> tuple[Row | None, str | None]:
    """``messages`` ending with an assistant turn (the SL-CAI output), or ``prompt`` +
    ``completion`` strings → conversational prompt/completion (only the completion is trained)."""
    if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str) and r.get("messages") is None:
        if not r["prompt"].strip():
            return None, "empty prompt"
        if not r["completion"].strip():
            return None, "empty completion"
        return {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["completion"]}],
        }, None
    if not isinstance(r.get("messages"), list) or len(r["messages"]) < 2:
        return None, "needs 'messages' (>= 2 turns) or 'prompt' + 'completion' strings"
    msgs = _messages(r["messages"])
    if msgs is None:
        return None, "malformed messages (each needs role system|user|assistant and string content)"
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        return None, "the last message must be a non-empty assistant turn"
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}, None


# -- human labels (HRLAIF) --------------------------------------------------------------------
def human_label_folder(data: str, setting: str):
    """The label run's output whose review/ holds people's labels, or None: ``setting`` is
    auto (``data`` itself when it is such a folder), none, or a folder."""
    from pathlib import Path

    if setting == "none":
        return None
    folder = Path(data) if setting == "auto" else Path(setting)
    has = (folder / "review" / "labels.jsonl").is_file()
    if setting != "auto" and not has:
        raise TrainDataError(f"human_labels: {folder} has no review/labels.jsonl (`cai-ray review` writes it)")
    return folder if has else None


def with_human_labels(rows: list[Row], data: str, setting: str, ties: bool) -> tuple[list[Row], dict[str, Any]]:
    """``rows`` with people's labels taking precedence over the AI's for the same pair (hard
    labels: A better 1, B better 0, a tie 0.5; several reviewers averaged): the pair's chosen,
    rejected and p_chosen come from the people, and a reviewed pair the AI's filter had dropped
    comes back from the review queue. ``ties``: whether the trainer can take p_chosen = 0.5
    (soft targets); otherwise a tied pair is left out and counted. Returns the rows and the
    manifest's figures (how many labels came from people)."""
    from cai_ray.core.review import ai_vs_human, human_labels, read_queue

    folder = human_label_folder(data, setting)
    if folder is None:
        return rows, {"pairs": 0}
    humans = human_labels(folder)
    queue = {q["pair_id"]: q for q in read_queue(folder)}
    index = {r["id"]: i for i, r in enumerate(rows)}
    out = list(rows)
    counts = {"pairs": 0, "overrode_ai": 0, "added": 0, "flipped": 0, "ties_left_out": 0, "not_in_queue": 0}
    dropped: set[int] = set()
    for pid, h in sorted(humans.items()):
        q = queue.get(pid)
        if q is None:  # a label for a pair this queue never held (another run's): not used
            counts["not_in_queue"] += 1
            continue
        p = h["p_a"]
        if p == 0.5 and not ties:
            counts["ties_left_out"] += 1
            if pid in index:
                dropped.add(index[pid])
            continue
        a = {"role": "assistant", "content": q["response_a"]}
        b = {"role": "assistant", "content": q["response_b"]}
        row = {
            "id": pid,
            "prompt": q["prompt"],
            "chosen": [a if p >= 0.5 else b],
            "rejected": [b if p >= 0.5 else a],
            "p_chosen": max(p, 1 - p),
        }
        counts["pairs"] += 1
        if pid in index:
            old = out[index[pid]]
            counts["overrode_ai"] += 1
            counts["flipped"] += old["chosen"][-1]["content"] != row["chosen"][0]["content"]
            out[index[pid]] = {**old, **row, "prompt": old["prompt"]}
        else:
            counts["added"] += 1
            out.append(row)
    out = [r for i, r in enumerate(out) if i not in dropped]
    return out, {**counts, "source": str(folder), "agreement": ai_vs_human(queue, humans)}


# -- tokenizer-bound steps: markup, lengths --------------------------------------------------
def neutralise_rows(rows: list[Row], tokenizer, parts: tuple[str, ...]) -> tuple[list[Row], int]:
    """``rows`` with the contents of ``prompt`` and each of ``parts`` neutralised for
    ``tokenizer`` (engine.neutralise), and how many rows held special-token markup. TRL's
    trainers tokenise the rows' chat template with special-token parsing: an
    ``<|im_end|><|im_start|>`` in the data would otherwise train forged turns. Run before
    ``reject_long``, so lengths are those of what is trained."""
    from cai_ray.engine import neutralise_messages

    out, changed = [], 0
    for row in rows:
        new = {**row, **{k: neutralise_messages(row[k], tokenizer) for k in ("prompt", *parts)}}
        changed += any(new[k] != row[k] for k in ("prompt", *parts))
        out.append(new)
    return out, changed


def reject_long(rows: list[Row], tokenizer, max_length: int, parts: tuple[str, ...]) -> tuple[list[Row], list[Reject]]:
    """Rows whose ``prompt`` + each of ``parts`` fits ``max_length`` tokens (chat template
    applied, as the trainers do); the others become rejects naming their length."""
    keep, rejects = [], []
    for row in rows:
        n = max(_n_tokens(tokenizer, row["prompt"] + row[part]) for part in parts)
        if n > max_length:
            rejects.append(
                {
                    "source": "data",
                    "line": None,
                    "id": row["id"],
                    "reason": f"longer than optim.max_length ({n} > {max_length} tokens)",
                    "raw": json.dumps(row)[:RAW_LIMIT],
                }
            )
        else:
            keep.append(row)
    return keep, rejects


def _n_tokens(tokenizer, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


# -- mixing, splits -------------------------------------------------------------------------
def mix_in(rows: list[Row], extra: list[Row], ratio: float, seed: int) -> tuple[list[Row], dict[str, Any]]:
    """``rows`` plus helpfulness rows making up ``ratio`` of the result, drawn without
    replacement (the file is repeated only when it is too small, and that is reported)."""
    want = round(len(rows) * ratio / (1 - ratio))
    rng = random.Random(seed)
    picked: list[Row] = []
    while len(picked) < want:
        pool = list(extra)
        rng.shuffle(pool)
        picked += pool[: want - len(picked)]
    mixed = rows + picked
    rng.shuffle(mixed)
    return mixed, {
        "rows": want,
        "available": len(extra),
        "repeated": want > len(extra),
        "share": round(want / len(mixed), 4) if mixed else 0.0,
    }


def split(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, held out) by prompt: a row is held out by a seeded hash of its prompt, so every
    pair of one prompt lands on the same side. The label step makes several pairs per prompt
    from k answers, sharing answers between them; split by pair id, a held-out pair's answers
    were trained on through its siblings and the held-out accuracy read high. The split does
    not depend on row order or on how many rows came before it."""
    from cai_ray.batch.readers import conversation_id

    def held(row: Row) -> bool:
        h = hashlib.sha256(f"{seed}:{conversation_id(row['prompt'])}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < fraction

    train = [r for r in rows if not held(r)]
    return train, [r for r in rows if held(r)]


def rows_sha256(rows: list[Row]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
