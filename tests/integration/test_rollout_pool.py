"""The rollout pool's control flow with scripted engine actors (fakes, named as such: they
stand in for the sampling, not for a feature): the staleness bound, the deadline on weight
transfers, and buckets. The real engines (hf, vLLM) run in tests/integration/test_ppo.py."""

import time

import pytest


class ScriptedEngine:
    """A fake engine actor: answers ``generate`` with the versions it is told to claim."""

    def __init__(self, versions):
        self.versions = list(versions)
        self.calls = 0

    def generate(self, prompts, *args):
        self.calls += 1
        v = self.versions.pop(0) if self.versions else 99
        return {"responses": [[1]] * len(prompts), "logprobs": [[-1.0]] * len(prompts), "version": v, "seconds": 0.0}

    def count(self):
        return self.calls


class StuckEngine:
    """A fake engine actor that never finishes taking a bucket (a dead or hung engine)."""

    def start_update(self):
        return None

    def receive(self, bucket):
        time.sleep(60)

    def finish_update(self, version):
        return version


def _source(ray, versions, mode="async", max_staleness=1):
    from cai_ray.train.ppo.pool import RolloutSource

    engine = ray.remote(ScriptedEngine).remote(versions)
    return engine, RolloutSource(
        [engine], 0, mode, max_staleness, timeout=30, submit=lambda e, step: e.generate.remote([[0], [0]])
    )


def test_a_batch_staler_than_the_bound_is_never_trained_on(ray_local):
    """Trainer at version 5, bound 1: a batch claiming version 3 is dropped and sampled again;
    version 4 is taken."""
    engine, src = _source(ray_local, [3, 4])
    got = src.next(step=7, version=5)
    assert got.version == 4 and got.regenerated == 1
    assert ray_local.get(engine.count.remote()) == 2


def test_an_engine_that_never_catches_up_fails_the_step_with_the_reason(ray_local):
    engine, src = _source(ray_local, [0, 0, 0, 0, 0])
    with pytest.raises(RuntimeError, match="weight sync is not reaching them"):
        src.next(step=3, version=3)


def test_async_prefetch_stays_within_the_bound_and_the_run(ray_local):
    engine, src = _source(ray_local, [0] * 10, max_staleness=2)
    src.prefetch(step=0, last=10)
    assert sorted(src.inflight) == [1, 2]  # two batches ahead, no more
    src.inflight.clear()
    src.prefetch(step=8, last=10)
    assert sorted(src.inflight) == [9]  # nothing past the last step
    other, sync = _source(ray_local, [0], mode="sync")
    sync.prefetch(step=0, last=10)
    assert not sync.inflight  # sync mode samples each batch when it is needed
    src.drop_inflight()
    ray_local.get([engine.count.remote(), other.count.remote()])  # both scheduled before they go


def test_a_weight_transfer_that_hangs_times_out_with_a_clear_error(ray_local):
    import torch

    from cai_ray.train.ppo.pool import push_weights
    from cai_ray.train.ppo.transfer import WeightSyncTimeout

    engine = ray_local.remote(StuckEngine).remote()
    params = [(f"layer.{i}", torch.zeros(1024)) for i in range(4)]
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match=r"did not take weight bucket 1 within 2 s"):
        push_weights([engine], iter(params), version=1, bucket_mb=4096 / 2**20, timeout=2, sender=True)
    assert time.monotonic() - t0 < 20
    ray_local.kill(engine)


def test_buckets_bound_their_size_and_keep_every_parameter():
    import torch

    from cai_ray.train.ppo.transfer import bucket_bytes, buckets

    params = [("a", torch.zeros(100)), ("b", torch.zeros(100)), ("big", torch.zeros(1000)), ("c", torch.zeros(10))]
    out = list(buckets(iter(params), 1000))
    assert [[n for n, _ in b] for b in out] == [["a", "b"], ["big"], ["c"]]
    assert all(bucket_bytes(b) <= 1000 or len(b) == 1 for b in out)


def test_a_parameter_viewing_a_flat_buffer_travels_without_the_buffer():
    """ZeRO-1/2 keep parameters as views into one flat buffer: a bucket must carry each
    parameter's own bytes, not the buffer behind it (pickled once per parameter)."""
    import pickle

    import torch

    from cai_ray.train.ppo.transfer import buckets

    flat = torch.zeros(100_000)
    params = [(f"p{i}", flat[i * 1000 : (i + 1) * 1000]) for i in range(10)]
    (bucket,) = buckets(iter(params), 2**30)
    assert len(pickle.dumps(bucket)) < 100_000  # 10 × 4 kB, not 10 × 400 kB


# -- the NCCL path (collective.py): what runs without a GPU ------------------------------------------
class RecordingEngine:
    """A fake engine actor recording the NCCL handshake's calls (no NCCL here: control flow only)."""

    def __init__(self):
        self.calls = []

    def init_transfer(self, info):
        self.calls.append(("init", info["rank_offset"], info["world_size"]))

    def start_update(self):
        self.calls.append(("start",))

    def receive_broadcast(self, info):
        self.calls.append(("receive", tuple(info["names"])))

    def finish_update(self, version):
        self.calls.append(("finish", version))
        return 0.25

    def log(self):
        return self.calls


def test_the_nccl_client_gives_each_engine_its_rank_and_the_round_its_version(ray_local):
    """vLLM's trainer engine names the first engine's NCCL rank; engine i must join at
    rank_offset + i (two engines at one rank would deadlock the group's rendezvous)."""
    from cai_ray.train.ppo.collective import PoolSyncClient

    engines = [ray_local.remote(RecordingEngine).remote() for _ in range(2)]
    client = PoolSyncClient(engines, timeout=30)
    client.init_weight_transfer_engine({"rank_offset": 1, "world_size": 3, "master_port": 1})
    client.version = 7
    client.start_weight_update()
    client.update_weights({"names": ["w"], "dtype_names": ["float32"], "shapes": [[2]]})
    client.finish_weight_update()
    logs = ray_local.get([e.log.remote() for e in engines])
    assert [log[0] for log in logs] == [("init", 1, 3), ("init", 2, 3)]
    for log in logs:
        assert log[1:] == [("start",), ("receive", ("w",)), ("finish", 7)]
    assert client.engine_seconds == 0.25


def test_an_nccl_round_that_never_returns_becomes_a_timeout():
    """A broadcast to a dead engine never returns (NCCL has no deadline): the trainer waits
    rollout.sync_timeout_s, then fails the step with the reason."""
    import threading

    from cai_ray.train.ppo.collective import within
    from cai_ray.train.ppo.transfer import WeightSyncTimeout

    never = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match=r"policy version 3 within 0.5 s"):
        within(never.wait, 0.5, "the NCCL weight transfer of policy version 3")
    assert time.monotonic() - t0 < 5
    assert within(lambda: 42, 5, "x") == 42
    with pytest.raises(KeyError):
        within(lambda: {}["missing"], 5, "x")  # the round's own error, in the trainer's thread


def test_the_policy_source_declares_what_it_yields_as_vllms_sender_checks():
    """vLLM's NCCL sender sizes the engines' receive buffers from metadata() and sends what
    iteration yields; its own check (_checked_iter) must pass over our source, and the bytes
    counted are the parameters' bytes."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from cai_ray.models import resolve_model
    from cai_ray.train.ppo.collective import metadata_bytes, policy_source
    from cai_ray.train.ppo.rollout import gathered_params

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random"), dtype=torch.bfloat16)
    source = policy_source(model.named_parameters, lambda: gathered_params(model, zero_stage=2))
    meta = source.metadata()
    sent = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))
    assert len(sent) == len(meta) == len(list(model.parameters()))
    assert metadata_bytes(meta) == sum(p.numel() * 2 for p in model.parameters())
    # a source that skips a parameter is caught before anything is sent
    short = policy_source(model.named_parameters, lambda: list(gathered_params(model, zero_stage=2))[1:])
    with pytest.raises(ValueError, match="disagrees|declared"):
        list(NCCLTrainerWeightTransferEngine._checked_iter(short, short.metadata()))


def test_auto_transfer_is_nccl_only_where_it_applies():
    from cai_ray.train.ppo.transfer import transfer_kind

    assert transfer_kind("auto", "vllm", lora=False, use_gpu=True) == "nccl"
    assert transfer_kind("auto", "vllm", lora=True, use_gpu=True) == "objstore"  # adapters are small
    assert transfer_kind("auto", "vllm", lora=False, use_gpu=False) == "objstore"
    assert transfer_kind("auto", "hf", lora=False, use_gpu=True) == "objstore"
    assert transfer_kind("objstore", "vllm", lora=False, use_gpu=True) == "objstore"
