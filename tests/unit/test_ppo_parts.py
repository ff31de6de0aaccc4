"""The PPO worker's parts that only GPUs and several ranks exercise, checked on CPU where their
cause can be reproduced: the device of collective tensors, response-only logits, the DeepSpeed
config with offload, and the colocated vLLM engine's device and sleep settings."""

from types import SimpleNamespace

import pytest
import torch


class Sentinel(Exception):
    pass


def test_reductions_use_the_collective_backends_device(monkeypatch):
    """NCCL refuses CPU tensors: a reduction across ranks must build its tensor on the rank's
    own device when the group is NCCL (``meta`` stands in for ``cuda:N`` on this CPU-only
    machine), and on the CPU with gloo."""
    import torch.distributed as dist

    from cai_ray.train.ppo.ranks import Ranks

    seen = []

    def all_reduce(t, *a, **k):
        seen.append(t.device)
        raise Sentinel

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    w = Ranks(0, 2, torch.device("meta"))
    for backend, want in (("nccl", torch.device("meta")), ("gloo", torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda *a, b=backend: b)
        with pytest.raises(Sentinel):
            w.mean(1.0)
        assert seen[-1] == want, backend
    w.world = 1  # one rank: nothing to reduce, nothing handed to a collective
    assert w.sum(3.0) == 3.0 and len(seen) == 2


def test_log_probs_come_from_response_logits_only(tiny_model):
    """``logprobs`` asks the model for the response positions' logits alone
    (``logits_to_keep``), and gets exactly what the full-sequence computation gives."""
    from transformers import AutoModelForCausalLM

    from cai_ray.train.ppo.learner import positions, response_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    asked = []
    forward = model.forward

    def spy(*a, **k):
        asked.append(k.get("logits_to_keep"))
        return forward(*a, **k)

    model.forward = spy
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, 11), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # a left-padded prompt
    p_len = 7
    with torch.no_grad():
        logp, logits = response_logprobs(model, ids, attn, p_len, 0.7, with_logits=True)
        full = forward(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits
    want = torch.log_softmax(full[:, p_len - 1 : -1].float() / 0.7, -1).gather(-1, ids[:, p_len:, None]).squeeze(-1)
    assert asked == [ids.shape[1] - p_len + 1]
    assert logits.shape == (3, ids.shape[1] - p_len, full.shape[-1])
    torch.testing.assert_close(logp, want)


def _job(zero=2, offload=False, dtype="float32"):
    from cai_ray.train.harness import WorkerJob

    cfg = SimpleNamespace(zero=zero, offload=offload, optim=SimpleNamespace(dtype=dtype))
    return WorkerJob("ppo", cfg, (), "/tmp/x", False)


@pytest.mark.parametrize("zero", [2, 3])
def test_offload_lets_deepspeed_take_our_optimizer(zero):
    """PPO hands DeepSpeed a torch AdamW; with offload DeepSpeed refuses a client optimizer
    unless ``zero_force_ds_cpu_optimizer`` is false (tests/integration/test_zero_cpu.py takes
    a real step with it)."""
    from cai_ray.train.ppo.learner import ds_config

    on = ds_config(_job(zero, offload=True), 2, 1)
    assert on["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert on["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in ds_config(_job(zero), 2, 1)
    frozen = ds_config(_job(zero, offload=True), 2, 1, frozen=True)
    assert frozen["zero_optimization"] == {"stage": 3 if zero == 3 else 0}


def test_colocated_vllm_takes_its_ranks_device_and_sleeps_on_gpus():
    """On GPUs each rank's in-process vLLM uses the external launcher (its device from
    LOCAL_RANK, not cuda:0) and sleep mode; the CPU build keeps the default executor. An
    engine on another device than its trainer is refused, whatever placed it there."""
    from cai_ray.train.ppo.rollout import check_device, colocated_args

    assert colocated_args(cpu=True, check_sync=False) == {}
    gpu = colocated_args(cpu=False, check_sync=False)
    assert gpu == {"distributed_executor_backend": "external_launcher", "enable_sleep_mode": True}

    class FakeLLM:
        def __init__(self, device):
            self.device = device

        def collective_rpc(self, fn):
            return [fn(SimpleNamespace(device=torch.device(self.device)))]

    check_device(FakeLLM("cpu"), "cpu")
    with pytest.raises(RuntimeError, match=r"engine is on \['meta'\], its trainer on cpu"):
        check_device(FakeLLM("meta"), "cpu")


def test_generation_keeps_ranks_in_step_only_under_zero3(monkeypatch):
    import torch.distributed as dist

    from cai_ray.train.ppo.rollout import synced_generation

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    assert synced_generation(3) and not synced_generation(2)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 1)
    assert not synced_generation(3)


def test_rl_prompts_that_leave_no_room_to_answer_are_rejected_by_the_one_rule(tmp_path, tiny_model):
    """A prompt plus ``rollout.max_new_tokens`` must fit ``optim.max_length`` (what the trainer
    holds): the boundary is inclusive and the reason is the one every step gives."""
    import json

    from support.ppo import _cfg
    from transformers import AutoTokenizer

    from cai_ray.train.ppo.loop import _encode, prompt_rows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = len(_encode(tok, [{"role": "user", "content": "x"}]))
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{n}", "prompt": "x" + " x" * n}) + "\n" for n in (0, 1)))
    # room for exactly the one-word prompt and its 4 new tokens
    cfg = _cfg(tmp_path, data, **{"optim.max_length": base + 4})
    keep, rejects = prompt_rows(cfg, tok)
    assert [r["id"] for r in keep] == ["r0"]
    assert [r["id"] for r in rejects] == ["r1"]
    assert (
        rejects[0]["reason"].startswith("too long for the policy: ")
        and f"> context length {base + 4}" in (rejects[0]["reason"])
    )
