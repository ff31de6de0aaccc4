"""PPO's rollout component: this rank's responses for a step, and after each update the new
weights to wherever an engine keeps its own copy. The sync and async loops share it.

    rollout.placement=colocated   the rank's own engine (rollout.make_rollout: hf samples with the
                                  training weights, vllm holds a copy synced in-process)
    rollout.placement=pool        the pool's engine actors (pool.py): behaviour log-probs and the
                                  sampling policy's version come back with every batch; weights
                                  travel through the object store (transfer.py) or, on GPUs with
                                  vLLM, over NCCL (collective.py)
"""

from __future__ import annotations

import logging
from typing import Any

from cai_ray.train import harness
from cai_ray.train.ppo.pool import Rollout

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, job: harness.WorkerJob, learner, ranks, tok, path: str, prompts_of):
        """``prompts_of(step)``: this rank's prompt ids for a step (the pool asks ahead of time)."""
        from cai_ray.train.ppo.rollout import make_rollout

        self.job, self.learner, self.ranks, self.tok = job, learner, ranks, tok
        self.prompts_of = prompts_of
        self.pooled = job.cfg.rollout.placement == "pool"
        self.engine = None
        self.handles: list = []
        self.source = None
        self.nccl = None  # collective.NcclPush, built at the first push with rollout.transfer=nccl
        if self.pooled:
            self._start_pool(path)
        else:
            self.engine = make_rollout(
                job.cfg.rollout.engine, learner.policy.module, tok, str(learner.device), path, job
            )

    @property
    def syncs(self) -> bool:
        """Whether the engines hold a copy of the weights that each update must refresh."""
        return self.pooled or not self.engine.shares_weights

    def seed(self, step: int) -> int:
        return hash((self.job.cfg.seed, step, self.ranks.rank)) % 2**31

    # -- the pool --------------------------------------------------------------------------------
    def _start_pool(self, path: str) -> None:
        """Rank 0 starts the engine actors; every rank gets their handles (a broadcast)."""
        import torch

        from cai_ray.train.ppo.pool import RolloutSource, start_pool

        job, r = self.job, self.job.cfg.rollout
        from cai_ray.train.ppo.transfer import transfer_kind

        lora = harness.lora_dict(job)
        self.transfer = transfer_kind(r.transfer, r.engine, lora is not None, bool(job.use_gpu))
        handles = None
        if self.ranks.rank == 0:
            dtype = "bfloat16" if self.learner.dtype == torch.bfloat16 else "float32"
            handles = start_pool(
                r, path, dtype, job.cfg.optim.max_length, job.cfg.seed, bool(job.use_gpu), lora, self.transfer
            )
        self.handles = self.ranks.broadcast(handles)
        self.source = RolloutSource(
            self.handles, self.ranks.rank, job.cfg.ppo.mode, job.cfg.ppo.max_staleness, r.sync_timeout_s, self._submit
        )

    def _submit(self, engine, step: int):
        """Ask ``engine`` for this rank's batch ``step`` (an ObjectRef)."""
        r = self.job.cfg.rollout
        return engine.generate.remote(self.prompts_of(step), r.max_new_tokens, r.temperature, r.top_p, self.seed(step))

    def push(self, version: int) -> dict[str, float]:
        """The policy (``version``) into every pool engine; every rank takes part (ZeRO-3
        gathers), rank 0 sends; ranks leave together."""
        from cai_ray.train.ppo.pool import push_weights

        r = self.job.cfg.rollout
        if self.transfer == "nccl":
            if self.nccl is None:
                from cai_ray.train.ppo.collective import NcclPush

                module = self.learner.policy.module
                self.nccl = NcclPush(
                    self.handles, self.ranks.rank, r.sync_timeout_s, module.named_parameters, self.learner.weights
                )
            stats = self.nccl.push(version)
            self.ranks.barrier()
            return stats
        stats = push_weights(
            self.handles,
            self.learner.weights(),
            version,
            r.sync_bucket_mb,
            r.sync_timeout_s,
            sender=self.ranks.rank == 0,
        )
        self.ranks.barrier()  # no rank samples again before the engines hold the new weights
        return stats

    # -- a step ----------------------------------------------------------------------------------
    def sample(self, step: int, version: int, prompts: list[list[int]]) -> Rollout:
        """Batch ``step``: response ids (up to and including EOS), and from a pool the
        behaviour log-probs and the version that sampled them."""
        r = self.job.cfg.rollout
        if self.pooled:
            got = self.source.next(step, version)
            self.source.prefetch(step, self.job.cfg.ppo.steps)  # async: the next batches sample while this trains
            return got
        responses = self.engine.generate(prompts, r.max_new_tokens, r.temperature, r.top_p, seed=self.seed(step))
        return Rollout(step=step, responses=responses, logprobs=None, version=version)

    def sleep(self) -> None:
        """A colocated vLLM frees its KV cache (and weights) for the update."""
        if self.engine is not None:
            self.engine.sleep()

    def after_update(self, version: int, check: list[list[int]] | None) -> dict[str, float]:
        """The new weights to the engines (when they hold a copy). With ``check`` prompts: the
        engine's greedy answers after the sync against the training policy's own
        (``sync_greedy_match``, 1.0 = every answer token for token; colocated also
        ``sync_greedy_changed`` against the answers before it) — a sync that silently fails
        leaves the engine sampling from the old policy. Pool: ``sync_bytes`` and friends, as
        rank 0 sent them (0 on the other ranks)."""
        n = self.job.cfg.rollout.max_new_tokens
        if not self.pooled:
            before = self.engine.greedy(check, n) if check else None
            self.engine.sync(self.learner.weights())
            if not check:
                return {}
            after, own = self.engine.greedy(check, n), self.learner.greedy_ids(check, n)
            return {
                "sync_greedy_match": sum(a == o for a, o in zip(after, own)) / len(check),
                "sync_greedy_changed": sum(a != b for a, b in zip(after, before)) / len(check),
            }
        out: dict[str, Any] = {k: 0.0 for k in ("sync_bytes", "sync_buckets", "sync_seconds", "sync_engine_seconds")}
        out.update(self.push(version))
        if check:
            from cai_ray.train.ppo.pool import get_within

            ref = self.source.engine.greedy.remote(check, n)
            own = self.learner.greedy_ids(check, n)
            after = get_within([ref], self.job.cfg.rollout.sync_timeout_s, "the rollout engine's greedy check")[0]
            out["sync_greedy_match"] = sum(a == o for a, o in zip(after, own)) / len(check)
        return out

    def restore(self, version: int) -> None:
        """After a restore: the restored weights to the engines; batches sampled before are dropped."""
        if self.pooled:
            self.source.drop_inflight()
            self.push(version)
        elif not self.engine.shares_weights:
            self.engine.sync(self.learner.weights())

    def close(self) -> None:
        """Stop the pool's engines (they would otherwise live until this worker's process ends)."""
        if self.nccl is not None:
            self.nccl.close()
        if self.pooled and self.ranks.rank == 0:
            import ray

            for h in self.handles:
                ray.kill(h)
