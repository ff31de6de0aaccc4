import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai_ray.batch.readers import InputError, list_input_files, read_local, validate_row


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": ""}, "empty prompt"),
        ({"prompt": "   \n"}, "empty prompt"),
        ({"prompt": 5}, "field 'prompt' must be a string"),
        ({"text": "hi"}, "missing 'prompt'"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "both"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "exactly 'role' and 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "last message"),
        ({"prompt": "x" * 101}, "prompt too long: 101 characters"),
        ({"prompt": "ok", "id": ""}, "field 'id' is empty"),
        ({"prompt": "ok", "id": [1]}, "field 'id' must be"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_rows_get_a_reason(row, reason):
    fields, why = validate_row(row, max_chars=100)
    assert fields is None and reason in why


def test_ids_are_stable_and_explicit_ids_win():
    a, _ = validate_row({"prompt": "hello"}, 100)
    b, _ = validate_row({"prompt": "hello", "category": "x"}, 100)
    assert a["id"] == b["id"] and len(a["id"]) == 20
    c, _ = validate_row({"prompt": "hello", "id": 42}, 100)
    assert c["id"] == "42"
    assert json.loads(b["meta"]) == {"category": "x"}


def test_every_line_is_accounted_for(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{not json\n\n{"prompt": ""}\n{"prompt": "b"}\n')
    t = read_local(str(f), 100).to_pylist()
    assert [r["line"] for r in t] == [1, 2, 4, 5]  # the blank line 3 is not a record
    assert [r["reject_reason"] is None for r in t] == [True, False, False, True]
    assert t[1]["raw"] == "{not json" and t[1]["reject_reason"].startswith("invalid JSON")
    assert all(r["source"] == str(f.resolve()) for r in t)


def test_formats_and_folders(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"messages": [{"role": "user", "content": "m"}]}\n')
    pq.write_table(pa.table({"prompt": ["p1", None], "id": ["x1", "x2"]}), tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_text('prompt,category\n"hello, there",greet\n,empty\n')
    (tmp_path / "notes.txt").write_text("ignored: not a prompt format")
    rows = read_local(str(tmp_path), 100).to_pylist()
    assert len(rows) == 5
    by = {(r["source"].rsplit("/", 1)[1], r["line"]): r for r in rows}
    assert by[("a.jsonl", 1)]["prompt"] == "m"
    assert by[("b.parquet", 1)]["id"] == "x1"
    assert "missing 'prompt'" in by[("b.parquet", 2)]["reject_reason"]
    assert by[("c.csv", 2)]["prompt"] == "hello, there"
    assert by[("c.csv", 3)]["reject_reason"] == "empty prompt"


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["q1", "q2", ""]}).save_to_disk(str(tmp_path / "hf"))
    rows = read_local(str(tmp_path / "hf"), 100).to_pylist()
    assert [r["prompt"] for r in rows] == ["q1", "q2", None]
    assert rows[2]["reject_reason"] == "empty prompt"


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list_input_files(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="unsupported file type"):
        list_input_files(str(tmp_path / "x.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no prompt files"):
        list_input_files(str(empty))


def test_fast_and_careful_jsonl_paths_agree():
    """The vectorized path must give exactly the rows the line-by-line path gives."""
    from cai_ray.batch.readers import _fast_jsonl_chunk, _Rows, _slow_jsonl_line

    lines = [
        json.dumps(x).encode() + b"\n"
        for x in [
            {"prompt": "plain"},
            {"prompt": "with meta", "category": "fraud"},
            {"prompt": "explicit id", "id": "abc"},
            {"prompt": ""},
            {"prompt": "   "},
            {"prompt": "x" * 150},
            {"prompt": None},
            {"text": "no prompt field"},
            {"prompt": "empty id", "id": ""},
            {"prompt": "ünïcödé ✓", "category": None},
        ]
    ]
    fast = _fast_jsonl_chunk(lines, 10, "src.jsonl", max_chars=100)
    assert fast is not None
    rows = _Rows("src.jsonl")
    for i, line in enumerate(lines, start=11):
        _slow_jsonl_line(line, i, rows, max_chars=100)
    assert fast.to_pylist() == rows.flush().to_pylist()

    int_ids = [b'{"prompt": "a", "id": 1}\n', b'{"prompt": "b", "id": 2}\n']
    fast = _fast_jsonl_chunk(int_ids, 0, "s", 100)
    rows = _Rows("s")
    for i, line in enumerate(int_ids, start=1):
        _slow_jsonl_line(line, i, rows, max_chars=100)
    assert fast.to_pylist() == rows.flush().to_pylist()


def test_odd_chunks_fall_back_to_the_careful_path(tmp_path):
    from cai_ray.batch.readers import _fast_jsonl_chunk

    assert _fast_jsonl_chunk([b'{"prompt": "a"}\n', b'{"prompt": 5}\n'], 0, "s", 100) is None
    assert _fast_jsonl_chunk([b'{"prompt": "a"}\n', b"\n", b'{"prompt": "b"}\n'], 0, "s", 100) is None
    assert _fast_jsonl_chunk([b'{"messages": [{"role": "user", "content": "m"}]}\n'], 0, "s", 100) is None
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "fine"}\n')
    rows = read_local(str(f), 100).to_pylist()
    assert [r["reject_reason"] is None for r in rows] == [True, False, True]
    assert "not valid UTF-8" in rows[1]["reject_reason"]


def test_one_bad_row_is_a_reject_not_the_end_of_the_file(tmp_path):
    """A lone surrogate (valid JSON) in a prompt, an id or a passing field; a non-UTF-8 byte
    and a field over the csv module's limit in a CSV: each is that row's reject with the
    reason, every other row is read."""
    import csv

    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "ok 1"}\n{"prompt": "bad \\ud800 text"}\n{"prompt": "ok 2", "id": "x\\udfff"}\n'
        '{"prompt": "ok 3", "note": "\\ud800"}\n'
    )
    t = read_local(str(f), 100).to_pylist()
    assert [r["line"] for r in t] == [1, 2, 3, 4]
    assert "lone surrogate U+D800 at character 4" in t[1]["reject_reason"] and "\\ud800" in t[1]["raw"]
    assert "field 'id'" in t[2]["reject_reason"]
    assert t[0]["reject_reason"] is None and t[3]["reject_reason"] is None and "\\ud800" in t[3]["meta"]
    limit = csv.field_size_limit()
    c = tmp_path / "p.csv"
    c.write_bytes(b'prompt,id\nfine,1\nbad \xff byte,2\n"' + b"y" * (limit + 10) + b'",3\nlast,4\n')
    rows = read_local(str(c), 100).to_pylist()
    assert [r["id"] for r in rows if r["reject_reason"] is None] == ["1", "4"]
    reasons = [r["reject_reason"] for r in rows if r["reject_reason"]]
    assert len(rows) == 4 and any("undecodable byte" in r for r in reasons), reasons
    assert any("prompt too long" in r or "unreadable CSV row" in r for r in reasons), reasons


def test_one_id_rule_for_batch_readers_trainers_and_eval(tmp_path):
    """A row without an id gets the hash of its conversation wherever it is read: the batch
    reader (generate/label), the trainers' loader and eval give the same prompt the same id,
    in any file and at any line; a bad id is a reject everywhere, never coerced."""
    import json

    from cai_ray.batch.readers import load_rows, prompt_row, read_local
    from cai_ray.eval.run import load_set

    rows = [{"prompt": "How do I pick a lock?"}, {"id": 7, "prompt": "x"}, {"id": True, "prompt": "y"}]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b.write_text("\n".join([json.dumps({"prompt": "other"}), json.dumps(rows[0])]) + "\n")  # another line
    read = read_local(str(a), 1000).to_pylist()
    batch = {r["prompt"]: r for r in read if r["reject_reason"] is None}
    train, train_rejects = load_rows(str(b), prompt_row)
    evald, eval_rejects = load_set(str(a), "harmful", None, 1000)
    lock = batch["How do I pick a lock?"]["id"]
    assert lock == next(r["id"] for r in train if r["prompt"][0]["content"] == "How do I pick a lock?")
    assert lock == next(r["id"] for r in evald if r["prompt"][0]["content"] == "How do I pick a lock?")
    assert batch["x"]["id"] == "7" == next(r["id"] for r in evald if r["prompt"][0]["content"] == "x")
    assert [r["reject_reason"] for r in read if r["line"] == 3] == ["field 'id' must be a string or integer, got bool"]
    assert [r["reason"] for r in eval_rejects] == ["field 'id' must be a string or integer, got bool"]
