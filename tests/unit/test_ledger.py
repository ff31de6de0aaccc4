from cai_ray.batch.ledger import DONE, DUPLICATE, NEW, REJECT, Ledger


def test_claims_new_done_duplicate_and_retries():
    led = Ledger(done_ids=["d1"])
    codes, dups = led.claim(["a", "d1", None, "a", "b"], ["f"] * 5, [1, 2, 3, 4, 5])
    assert codes.tolist() == [NEW, DONE, REJECT, DUPLICATE, NEW] and dups == {3: "f:1"}
    # a retried read task: same rows, same answers, counted once
    again, dups2 = led.claim(["a", "d1", None, "a", "b"], ["f"] * 5, [1, 2, 3, 4, 5])
    assert again.tolist() == codes.tolist() and dups2 == dups
    # a later block (other file) with an id seen before
    codes, dups = led.claim(["b", "c"], ["g", "g"], [1, 2])
    assert codes.tolist() == [DUPLICATE, NEW] and dups == {0: "f:5"}
    c = led.report()["counts"]
    assert c == {"read": 7, "new": 3, "done": 1, "reject": 1, "duplicate": 2}


def test_arrow_inputs_and_many_blocks():
    import pyarrow as pa

    led = Ledger(done_ids=[f"id{i}" for i in range(0, 1000, 2)])
    for block in range(20):
        ids = pa.array([f"id{i}" for i in range(block * 50, block * 50 + 50)])
        lines = pa.array(list(range(block * 50 + 1, block * 50 + 51)), pa.int64())
        codes, _ = led.claim(ids, pa.array(["f"] * 50), lines)
        assert codes.tolist() == [DONE if i % 2 == 0 else NEW for i in range(block * 50, block * 50 + 50)]
    codes, dups = led.claim(["id999"], ["other"], [1])
    assert codes.tolist() == [DUPLICATE] and dups == {0: "f:1000"}
    assert led.report()["counts"]["read"] == 1001


def test_exactly_once_check_catches_a_duplicate(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from cai_ray.batch.stage import check_exactly_once

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "data" / "part-1.parquet")
    assert check_exactly_once(tmp_path) == 2
    pq.write_table(pa.table({"id": ["c", "a"]}), tmp_path / "data" / "part-2.parquet")
    with pytest.raises(RuntimeError, match=r"duplicate ids \['a'\]"):
        check_exactly_once(tmp_path)
