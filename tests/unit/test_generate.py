"""The SL-CAI stage on a real local Ray cluster with the tiny random model."""

import json
import os

import pytest
from support.generate import ROOT, run, write_prompts

from cai_ray.core.constitution import load_constitution


class _FailsOn:
    """Stand-in engine for a control-flow test: the benchmark-only noop engine, except that
    any batch holding a prompt with BOOM raises (as an endpoint answering 400 would)."""

    def __init__(self, inner, broken=False):
        self.inner, self.broken = inner, broken

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, convs, params):
        if self.broken or any("BOOM" in m["content"] for c in convs for m in c):
            raise ValueError("400: the endpoint refused this prompt")
        return self.inner.generate(convs, params)


def test_an_engine_error_on_one_prompt_rejects_that_row_only(tmp_path):
    from cai_ray.batch.readers import read_local
    from cai_ray.engine import Sampling
    from cai_ray.generate.run import SLWorker

    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(["a", "BOOM", "c"])))
    batch = read_local(str(inp), 1000)
    c = load_constitution(ROOT / "constitutions" / "general.yaml")
    w = SLWorker("noop", {"model": "noop"}, c, 1, True, None, 0, Sampling(temperature=0.0, max_new_tokens=8))
    w.engine = _FailsOn(w.engine)
    out = w(batch).to_pylist()
    assert [r["id"] for r in out] == ["r0", "r1", "r2"]
    assert out[1]["reject_reason"].startswith("the engine failed on this prompt: ValueError: 400")
    assert out[0]["reject_reason"] is None and out[2]["reject_reason"] is None and out[2]["revision"]
    w.engine = _FailsOn(w.engine.inner, broken=True)  # every row fails alone too: the engine is broken
    with pytest.raises(ValueError, match="400"):
        w(batch)


def test_two_runs_into_one_output_folder_are_locked_out(tmp_path):
    """The second run stops at once, saying who holds the folder; the lock goes with its
    holder (an flock), so a crashed run leaves nothing to clean up."""
    from cai_ray.runtime import OutputBusy, output_lock

    inp = tmp_path / "p.jsonl"
    write_prompts(inp, 2)
    with output_lock(tmp_path / "out"):
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
            run(inp, tmp_path / "out")
        with pytest.raises(OutputBusy):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):  # released: free again
        pass
