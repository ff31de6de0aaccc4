"""SL-CAI data on Ray Data: answer → critique → revise ×N, keeping the full trace.

    read prompts ─► claim ids (ledger) ─► SLWorker on an engine actor pool ─► SLDatasink
    PROMPT_SCHEMA                        SL_SCHEMA                          data/*.parquet
                                                                            rejects.jsonl

Reads: PROMPT_SCHEMA columns. Writes: SL_SCHEMA columns (records.py). Rows with a
``reject_reason`` pass through every stage untouched and land in ``rejects.jsonl``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa

from cai_ray.batch.records import SL_OUTPUT_COLUMNS, SL_SCHEMA, append_message
from cai_ray.batch.stage import engine_threads, failure_reason, isolate_failures, raise_if_all_failed, with_reasons
from cai_ray.core import prompts
from cai_ray.core.constitution import Constitution, load_constitution
from cai_ray.core.context import context_overflow
from cai_ray.core.seeds import batch_seed
from cai_ray.engine import Sampling, load_engine

log = logging.getLogger(__name__)


class SLWorker:
    """One engine actor. ``__call__`` takes a PROMPT_SCHEMA table and returns SL_SCHEMA."""

    def __init__(
        self,
        backend: str,
        engine_kwargs: dict[str, Any],
        constitution: Constitution,
        revisions: int,
        critique: bool,
        few_shot: int | None,
        seed: int,
        sampling: Sampling,
        ledger=None,
        max_actors: int = 1,
        async_chains: bool = True,
    ):
        start = time.perf_counter()
        self.engine = load_engine(backend, **engine_threads(backend, engine_kwargs, max_actors))
        self.constitution = constitution
        self.revisions = revisions
        self.critique = critique
        self.seed = seed
        self.sampling = sampling
        self.ledger = ledger
        self.async_chains = async_chains and getattr(self.engine, "supports_async", False)
        self.shots = prompts.few_shot_turns(constitution, few_shot, with_critique=critique)
        self.overhead = self._template_overhead()
        if ledger is not None:
            ledger.add_engine_stats.remote(model_load_s=time.perf_counter() - start, actors_started=1)

    def _template_overhead(self) -> int:
        """Tokens the revision template adds around a prompt (few-shot turns, the longest
        principle's requests, chat markup), measured once. Counting each prompt alone and
        adding this avoids tokenizing the few-shot turns again for every row."""
        longest = max(
            self.constitution.principles,
            key=lambda p: len(p.critique_request) + len(p.revision_request),
        )
        probe = [prompts.user("x")]
        full = prompts.revision_messages(self.shots, probe, "", longest, "" if self.critique else None)
        with_template, bare = self.engine.token_counts([full, probe])
        return with_template - bare + 8  # + a margin for merges at message boundaries

    def _generate(self, convs, ids, stage):
        params = replace(self.sampling, seed=batch_seed(self.seed, ids, stage))
        return self.engine.generate(convs, params)

    def _chains_batched(self, ids, convs, drawn):
        """Every row's chain in lock-step: one engine call per step for the whole batch (a
        step waits for the slowest row of the previous one). [(answer, trace, revision)]"""
        current = self._generate([prompts.answer_messages(c) for c in convs], ids, "answer")
        first = current
        trace: list[list[dict]] = [[] for _ in ids]
        for step in range(self.revisions):
            principles = [d[step] for d in drawn]
            critiques: list[str | None] = [None] * len(ids)
            if self.critique:
                critiques = self._generate(
                    [
                        prompts.critique_messages(self.shots, c, resp, p)
                        for c, resp, p in zip(convs, current, principles)
                    ],
                    ids,
                    f"critique{step}",
                )
            current = self._generate(
                [
                    prompts.revision_messages(self.shots, c, resp, p, k)
                    for c, resp, p, k in zip(convs, current, principles, critiques)
                ],
                ids,
                f"revision{step}",
            )
            for t, p, k, rev in zip(trace, principles, critiques, current):
                t.append({"principle_id": p.id, "critique": k, "revision": rev})
        return list(zip(first, trace, current))

    def _chains_async(self, ids, convs, drawn):
        """Each row's chain as its own request stream on an async engine (vLLM): a row's
        critique starts when *its* answer is done, so the engine's batch stays full of
        work instead of draining at every step. Each request is seeded by its row id and
        step, so a row's text does not depend on the batch it came in."""
        params = self.sampling
        eng = self.engine

        async def chain(rid, conv, principles):
            def seed(stage):
                return batch_seed(self.seed, [rid], stage)

            current = first = await eng.agenerate(prompts.answer_messages(conv), params, seed("answer"))
            trace = []
            for step, p in enumerate(principles):
                critique = None
                if self.critique:
                    critique = await eng.agenerate(
                        prompts.critique_messages(self.shots, conv, current, p), params, seed(f"critique{step}")
                    )
                current = await eng.agenerate(
                    prompts.revision_messages(self.shots, conv, current, p, critique), params, seed(f"revision{step}")
                )
                trace.append({"principle_id": p.id, "critique": critique, "revision": current})
            return first, trace, current

        async def all_rows():
            # a row whose request fails is that row's error, not the batch's
            return await asyncio.gather(*(chain(r, c, d) for r, c, d in zip(ids, convs, drawn)), return_exceptions=True)

        return eng.run(all_rows())

    def _chains(self, ids, convs, drawn) -> list:
        """Every row's (answer, trace, revision), or the exception its requests raised
        (stage.isolate_failures: one bad prompt does not fail its batch)."""
        if not self.async_chains:
            return isolate_failures(
                lambda rows: self._chains_batched(*map(list, zip(*rows))), list(zip(ids, convs, drawn))
            )
        out = self._chains_async(ids, convs, drawn)
        raise_if_all_failed(out)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """PROMPT_SCHEMA table in, SL_SCHEMA table out. Column-wise: the prompt columns pass
        through as Arrow arrays; only the conversations are turned into Python objects."""
        t0 = time.perf_counter()
        n = batch.num_rows
        ids = batch["id"].to_pylist()
        reasons = batch["reject_reason"].to_pylist()
        convs_all = batch["prompt_messages"].to_pylist()
        todo = [i for i in range(n) if reasons[i] is None]

        # Reject prompts the model cannot hold: the revision prompt (template + prompt) and
        # every answer, critique and revision generated into it.
        budget = (3 if self.critique else 2) * self.sampling.max_new_tokens
        counts = self.engine.token_counts([convs_all[i] for i in todo]) if todo else []
        for i, tokens in zip(todo, counts):
            reasons[i] = context_overflow("the model", tokens + self.overhead, budget, self.engine.context_length)
        todo = [i for i in todo if reasons[i] is None]

        init, steps, final = [None] * n, [None] * n, [None] * n
        tokens_before = getattr(self.engine, "tokens_generated", 0)
        if todo:
            good_ids = [ids[i] for i in todo]
            convs = [convs_all[i] for i in todo]
            drawn = [self.constitution.sample(rid, self.revisions, self.seed) for rid in good_ids]
            for i, result in zip(todo, self._chains(good_ids, convs, drawn)):
                if isinstance(result, BaseException):
                    reasons[i] = failure_reason("prompt", result)
                else:
                    init[i], steps[i], final[i] = result

        if self.ledger is not None:
            self.ledger.add_engine_stats.remote(
                engine_s=time.perf_counter() - t0,
                tokens=getattr(self.engine, "tokens_generated", 0) - tokens_before,
            )
        out = with_reasons(batch, reasons)
        done = [r is None for r in reasons]
        messages = append_message(batch["prompt_messages"], "assistant", final, done)
        new = {
            "init_response": pa.array(init, pa.string()),
            "steps": pa.array(steps, SL_SCHEMA.field("steps").type),
            "revision": pa.array(final, pa.string()),
            "messages": messages,
            "chosen": messages,  # TRL preference format: the revision is preferred ...
            "rejected": append_message(batch["prompt_messages"], "assistant", init, done),  # ... to the first answer
        }
        for name, values in new.items():
            out = out.append_column(SL_SCHEMA.field(name), values)
        return out.select(SL_SCHEMA.names)


def generation_fingerprint(config: dict[str, Any], constitution: Constitution) -> dict[str, Any]:
    """What must not change between a run and its resume (else the output would mix)."""
    return {
        "model": config["engine"]["model"],
        "constitution_sha256": constitution.sha256,
        "revisions": config["revisions"],
        "critique": config["critique"],
        "few_shot": config["few_shot"],
        "seed": config["seed"],
        "sampling": config["sampling"],
        # per-row seeds (async chains) and per-batch seeds draw different samples
        "async_chains": config["async_chains"] and config["engine"]["backend"] == "vllm",
    }


# -- the job ------------------------------------------------------------------------------
def generate(cfg) -> dict[str, Any]:
    """Run the SL-CAI stage described by a ``GenerateConfig``; returns the manifest.

    Resumable: ids already in ``OUTPUT/data`` are skipped; re-running a finished job writes
    nothing new. ``rejects.jsonl`` and the counts are recomputed over the whole input.
    """
    from cai_ray.batch.sink import StageDatasink
    from cai_ray.batch.stage import Pool, StageRun, actor_engine_kwargs, actor_pool_args, run_stage
    from cai_ray.config import to_dict
    from cai_ray.models import model_info

    config = to_dict(cfg)
    constitution = load_constitution(cfg.constitution)
    pool = cfg.pool

    def build(ds, ledger):
        return ds.map_batches(
            SLWorker,
            fn_constructor_kwargs=dict(
                backend=cfg.engine.backend,
                engine_kwargs=actor_engine_kwargs(cfg.engine),
                constitution=constitution,
                revisions=cfg.revisions,
                critique=cfg.critique,
                few_shot=cfg.few_shot,
                seed=cfg.seed,
                sampling=Sampling.of(cfg.sampling),
                ledger=ledger,
                max_actors=pool.max_actors,
                async_chains=cfg.async_chains,
            ),
            **actor_pool_args(pool, cfg.engine.backend),
        )

    return run_stage(
        StageRun(
            kind="generate",
            cfg=cfg,
            config=config,
            fingerprint=generation_fingerprint(config, constitution),
            manifest_extra=dict(
                constitution=constitution.summary(),
                model=model_info(cfg.engine.model, cfg.engine.backend, cfg.engine.base_url),
            ),
            pools=[Pool("pool", cfg.engine.backend, pool)],
            read_pool=pool,
            build=build,
            sink=StageDatasink(cfg.output, cfg.outputs.rows_per_file, SL_OUTPUT_COLUMNS),
        )
    )
