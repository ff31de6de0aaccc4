from cai_ray.ledger import Ledger


def test_claims_new_done_duplicate_and_retries():
    led = Ledger(done_ids=["d1"])
    s = led.claim(["a", "d1", None, "a", "b"], ["f"] * 5, [1, 2, 3, 4, 5])
    assert s == ["new", "done", "reject", "duplicate f:1", "new"]
    # a retried read task: same rows, same answers, counted once
    assert led.claim(["a", "d1", None, "a", "b"], ["f"] * 5, [1, 2, 3, 4, 5]) == s
    # a later block (other file) with an id seen before
    assert led.claim(["b", "c"], ["g", "g"], [1, 2]) == ["duplicate f:5", "new"]
    c = led.report()["counts"]
    assert c == {"read": 7, "new": 3, "done": 1, "reject": 1, "duplicate": 2}


def test_many_blocks_merge_levels():
    led = Ledger(done_ids=[f"id{i}" for i in range(0, 1000, 2)])
    for block in range(20):
        ids = [f"id{i}" for i in range(block * 50, block * 50 + 50)]
        s = led.claim(ids, ["f"] * 50, list(range(block * 50 + 1, block * 50 + 51)))
        assert s == ["done" if i % 2 == 0 else "new" for i in range(block * 50, block * 50 + 50)]
    assert led.claim(["id999"], ["other"], [1]) == ["duplicate f:1000"]
    assert led.report()["counts"]["read"] == 1001
