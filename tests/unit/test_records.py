import pyarrow as pa

from cai_ray.batch.records import MESSAGES, append_message


def test_append_message_matches_python_and_respects_nulls():
    convs = [
        [{"role": "user", "content": "a"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
        None,
        [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
    ]
    arr = pa.array(convs, MESSAGES).slice(1)  # a sliced array: offsets do not start at 0
    texts = ["x", None, "z"]
    valid = [True, False, True]
    out = append_message(arr, "assistant", texts, valid).to_pylist()
    assert out[0] == convs[1] + [{"role": "assistant", "content": "x"}]
    assert out[1] is None
    assert out[2] == convs[3] + [{"role": "assistant", "content": "z"}]
