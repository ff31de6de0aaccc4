"""SL-CAI data on Ray Data: answer → critique → revise ×N, keeping the full trace.

    read prompts ─► claim ids (ledger) ─► SLWorker on an engine actor pool ─► SLDatasink
    PROMPT_SCHEMA                        SL_SCHEMA                          data/*.parquet
                                                                            rejects.jsonl

Reads: PROMPT_SCHEMA columns. Writes: SL_SCHEMA columns (records.py). Rows with a
``reject_reason`` pass through every stage untouched and land in ``rejects.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from cai_ray import prompts
from cai_ray.constitution import Constitution, load_constitution
from cai_ray.engine import Sampling, load_engine
from cai_ray.records import SL_OUTPUT_COLUMNS, SL_SCHEMA, append_message

log = logging.getLogger(__name__)

READ_BLOCK_ROWS = 4096  # lines parsed (and ids claimed) per read block


def with_reasons(table: pa.Table, reasons: list[str | None]) -> pa.Table:
    """``table`` with its reject_reason column replaced."""
    i = table.schema.get_field_index("reject_reason")
    return table.set_column(i, "reject_reason", pa.array(reasons, pa.string()))


def batch_seed(seed: int, ids: list[str], stage: str) -> int:
    """A generation seed fixed by the batch's contents: a retried batch samples the same."""
    h = hashlib.sha256(f"{seed}|{stage}|{'|'.join(ids)}".encode()).digest()
    return int.from_bytes(h[:4], "big")


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
        sampling: dict[str, Any],
        ledger=None,
        max_actors: int = 1,
    ):
        start = time.perf_counter()
        if backend == "hf" and not engine_kwargs.get("threads"):
            engine_kwargs = {**engine_kwargs, "threads": max(1, (os.cpu_count() or 1) // max_actors)}
        self.engine = load_engine(backend, **engine_kwargs)
        self.constitution = constitution
        self.revisions = revisions
        self.critique = critique
        self.seed = seed
        self.sampling = sampling
        self.ledger = ledger
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
        full = prompts.revision_messages(
            self.shots, probe, "", longest, "" if self.critique else None
        )
        with_template, bare = self.engine.token_counts([full, probe])
        return with_template - bare + 8  # + a margin for merges at message boundaries

    def _generate(self, convs, ids, stage):
        params = Sampling(**self.sampling, seed=batch_seed(self.seed, ids, stage))
        return self.engine.generate(convs, params)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """PROMPT_SCHEMA table in, SL_SCHEMA table out. Column-wise: the prompt columns pass
        through as Arrow arrays; only the conversations are turned into Python objects."""
        t0 = time.perf_counter()
        n = batch.num_rows
        ids = batch["id"].to_pylist()
        reasons = batch["reject_reason"].to_pylist()
        convs_all = batch["prompt_messages"].to_pylist()
        todo = [i for i in range(n) if reasons[i] is None]

        # Reject prompts the model cannot hold: template + prompt + every generation budget.
        n_gen = 3 if self.critique else 2
        budget = n_gen * self.sampling["max_new_tokens"] + self.overhead
        counts = self.engine.token_counts([convs_all[i] for i in todo]) if todo else []
        for i, tokens in zip(todo, counts):
            if tokens + budget > self.engine.context_length:
                reasons[i] = (
                    f"prompt too long for the model: {tokens} prompt tokens + {self.overhead} "
                    f"template tokens + {budget - self.overhead} generation budget > context "
                    f"length {self.engine.context_length}"
                )
        todo = [i for i in todo if reasons[i] is None]

        init, steps, final = [None] * n, [None] * n, [None] * n
        tokens_before = getattr(self.engine, "tokens_generated", 0)
        if todo:
            good_ids = [ids[i] for i in todo]
            convs = [convs_all[i] for i in todo]
            current = self._generate([prompts.answer_messages(c) for c in convs], good_ids, "answer")
            first = current
            drawn = [self.constitution.sample(rid, self.revisions, self.seed) for rid in good_ids]
            trace: list[list[dict]] = [[] for _ in todo]
            for step in range(self.revisions):
                principles = [d[step] for d in drawn]
                critiques: list[str | None] = [None] * len(todo)
                if self.critique:
                    critiques = self._generate(
                        [
                            prompts.critique_messages(self.shots, c, resp, p)
                            for c, resp, p in zip(convs, current, principles)
                        ],
                        good_ids,
                        f"critique{step}",
                    )
                current = self._generate(
                    [
                        prompts.revision_messages(self.shots, c, resp, p, k)
                        for c, resp, p, k in zip(convs, current, principles, critiques)
                    ],
                    good_ids,
                    f"revision{step}",
                )
                for t, p, k, rev in zip(trace, principles, critiques, current):
                    t.append({"principle_id": p.id, "critique": k, "revision": rev})
            for j, i in enumerate(todo):
                init[i], steps[i], final[i] = first[j], trace[j], current[j]

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


def claim_ids(batch: pa.Table, ledger) -> pa.Table:
    """Drop ids already written by an earlier run; turn duplicate ids into rejects."""
    import ray

    from cai_ray.ledger import DONE

    codes, dups = ray.get(ledger.claim.remote(batch["id"], batch["source"], batch["line"]))
    if dups:
        reasons = batch["reject_reason"].to_pylist()
        for i, first in dups.items():
            reasons[i] = f"duplicate id (first seen at {first})"
        batch = with_reasons(batch, reasons)
    if (codes == DONE).any():
        batch = batch.filter(pa.array(codes != DONE))
    return batch


# -- output -------------------------------------------------------------------------------
class SLDatasink(Datasink):
    """Writes good rows to data/part-*.parquet and rejects to _rejects/part-*.jsonl.

    A part's name is a hash of the ids in it and it is written to a temp name and renamed,
    so a retried write task overwrites the same file instead of duplicating rows, and a
    crash never leaves a half-written part that resume would trust.
    """

    def __init__(self, out_dir: str, rows_per_file: int, columns: list[str]):
        self.out = Path(out_dir)
        self.rows_per_file = rows_per_file
        self.columns = columns

    @property
    def min_rows_per_write(self):
        return self.rows_per_file

    def write(self, blocks, ctx) -> None:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="permissive")
        bad_mask = pc.is_valid(table["reject_reason"])
        good, bad = table.filter(pc.invert(bad_mask)), table.filter(bad_mask)
        if good.num_rows:
            _atomic_parquet(good.select(self.columns), self.out / "data", good["id"].to_pylist())
        if bad.num_rows:
            recs = reject_records(bad)
            name = _part_name([(r["source"], r["line"]) for r in recs]) + ".jsonl"
            _write_jsonl_atomic(self.out / "_rejects" / name, recs)


def _part_name(keys: list) -> str:
    return "part-" + hashlib.sha1("\x00".join(map(str, keys)).encode()).hexdigest()[:20]


def _atomic_parquet(table: pa.Table, folder: Path, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / (_part_name(ids) + ".parquet")
    tmp = folder / f".{final.name}.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, final)


def reject_records(table: pa.Table) -> list[dict[str, Any]]:
    return [
        {"source": r["source"], "line": r["line"], "id": r["id"], "reason": r["reject_reason"], "raw": r["raw"]}
        for r in table.select(["source", "line", "id", "reject_reason", "raw"]).to_pylist()
    ]


def _write_jsonl_atomic(path: Path, recs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    os.replace(tmp, path)


def existing_ids(out_dir: Path) -> pa.ChunkedArray:
    """Ids already in data/*.parquet (finished parts only: temp files start with '.')."""
    data = out_dir / "data"
    files = sorted(data.glob("part-*.parquet")) if data.exists() else []
    if not files:
        return pa.chunked_array([], pa.string())
    return pa.concat_tables(pq.read_table(f, columns=["id"]) for f in files)["id"]


def finalize_rejects(out_dir: Path) -> list[dict[str, Any]]:
    """Merge reject parts into rejects.jsonl, sorted by (source, line); returns them."""
    parts = sorted((out_dir / "_rejects").glob("part-*.jsonl")) if (out_dir / "_rejects").exists() else []
    recs = []
    for p in parts:
        recs += [json.loads(line) for line in p.read_text().splitlines() if line]
    recs.sort(key=lambda r: (r["source"], r["line"]))
    _write_jsonl_atomic(out_dir / "rejects.jsonl", recs)
    return recs


def check_exactly_once(out_dir: Path) -> int:
    """Every id in data/ exactly once; returns the row count. A violation is a bug: raise.
    Counted in Arrow, so a million ids cost a few MB in the driver, not Python strings."""
    ids = existing_ids(out_dir)
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[:5].to_pylist()
        raise RuntimeError(f"exactly-once violated in {out_dir}/data: duplicate ids {dup}")
    return len(ids)


def clean_partial(out_dir: Path) -> None:
    """Remove temp files of a crashed run and the previous run's reject parts."""
    for folder in (out_dir / "data", out_dir / "_rejects"):
        if folder.exists():
            for f in folder.glob(".*.tmp*"):
                f.unlink()
    rejects = out_dir / "_rejects"
    if rejects.exists():
        for f in rejects.glob("part-*.jsonl"):
            f.unlink()


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
    }


def refuse_mixed_output(out: Path, fingerprint: dict[str, Any]) -> None:
    """A resume must use the settings that made the existing output, or rows would mix."""
    manifest_path = out / "manifest.json"
    if not (manifest_path.exists() and (out / "data").exists()):
        return
    previous = json.loads(manifest_path.read_text()).get("fingerprint")
    if previous and previous != fingerprint:
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint.get(k))
        raise ValueError(
            f"{out} holds output made with different settings ({', '.join(changed)}); "
            "resuming would mix them. Use a new --output, or delete the old one."
        )


# -- the job ------------------------------------------------------------------------------
def generate(cfg) -> dict[str, Any]:
    """Run the SL-CAI stage described by a ``GenerateConfig``; returns the manifest.

    Resumable: ids already in ``OUTPUT/data`` are skipped; re-running a finished job writes
    nothing new. ``rejects.jsonl`` and the counts are recomputed over the whole input.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from cai_ray import runtime
    from cai_ray.config import to_dict
    from cai_ray.datasets import list_input_files, read_prompts
    from cai_ray.ledger import Ledger
    from cai_ray.models import is_alias, resolve_model

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    config = to_dict(cfg)
    constitution = load_constitution(cfg.constitution)
    files = list_input_files(cfg.input)  # fail fast on a bad path
    fingerprint = generation_fingerprint(config, constitution)
    manifest_path = out / "manifest.json"
    refuse_mixed_output(out, fingerprint)

    model_info: dict[str, Any] = {"name": cfg.engine.model, "backend": cfg.engine.backend}
    if cfg.engine.backend != "noop":
        resolved = resolve_model(cfg.engine.model)  # fails fast on an unknown name
        if is_alias(cfg.engine.model) or Path(resolved).exists():
            model_info.update(runtime.model_fingerprint(resolved))

    manifest = runtime.base_manifest("sl", config)
    manifest.update(
        fingerprint=fingerprint,
        constitution=constitution.summary(),
        model=model_info,
        inputs=[f for f, _ in files],
    )
    runtime.write_json_atomic(manifest_path, manifest)

    runtime.init_ray(cfg.ray_address)
    check_resources(cfg)
    clean_partial(out)
    done = existing_ids(out)
    ledger = ray.remote(num_cpus=0)(Ledger).remote(done)
    if len(done):
        log.info("resuming: %d ids already written in %s", len(done), out / "data")

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    pool = cfg.pool
    if pool.object_store_gb:
        # Bounds the data in flight: the pipeline streams at the same rate, and the object
        # store's resident pages stop growing with the number of rows.
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=pool.object_store_gb * 2**30)
    t0 = time.perf_counter()
    try:
        ds = read_prompts(
            cfg.input, cfg.inputs.max_prompt_chars, max(READ_BLOCK_ROWS, pool.batch_size), pool.task_cpus
        )
        ds = ds.map_batches(
            claim_ids, fn_kwargs={"ledger": ledger}, batch_format="pyarrow",
            batch_size=None, num_cpus=pool.task_cpus,
        )
        # An actor task handles a whole input block: blocks of one engine batch keep every
        # actor of the pool busy, and a killed actor's retry redoes one batch, not a file.
        ds = ds.repartition(target_num_rows_per_block=pool.batch_size)
        ds = ds.map_batches(
            SLWorker,
            fn_constructor_kwargs=dict(
                backend=cfg.engine.backend,
                engine_kwargs=cfg.engine.engine_kwargs(),
                constitution=constitution,
                revisions=cfg.revisions,
                critique=cfg.critique,
                few_shot=cfg.few_shot,
                seed=cfg.seed,
                sampling=config["sampling"],
                ledger=ledger,
                max_actors=pool.max_actors,
            ),
            batch_size=pool.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_cpus=pool.cpus_per_actor,
            num_gpus=pool.gpus_per_actor or None,
        )
        ds.write_datasink(
            SLDatasink(str(out), cfg.outputs.rows_per_file, SL_OUTPUT_COLUMNS),
            ray_remote_args={"num_cpus": pool.task_cpus},
        )
    except BaseException as e:
        manifest.update(status="failed", finished=runtime.now(), error=f"{type(e).__name__}: {e}")
        runtime.write_json_atomic(manifest_path, manifest)
        raise
    wall = time.perf_counter() - t0

    t1 = time.perf_counter()
    report = ray.get(ledger.report.remote())
    rejects = finalize_rejects(out)
    rejected = len(rejects)
    total = check_exactly_once(out)
    finalize_s = time.perf_counter() - t1
    c = report["counts"]
    counts = {
        "read": c.get("read", 0),
        "written": c.get("done", 0) + total - len(done),
        "written_this_run": total - len(done),
        "already_done": c.get("done", 0),
        "rejected": rejected,
        "rows_in_output": total,
    }
    # Every input row is written (now or by an earlier run) or rejected: never dropped.
    if counts["read"] != counts["written"] + counts["rejected"]:
        raise RuntimeError(f"row accounting does not add up (a row was lost): {counts}")
    eng = report["engine"]
    manifest.update(
        status="finished",
        finished=runtime.now(),
        counts=counts,
        rejects_by_reason=_reasons(rejects),
        timing={
            "wall_s": round(wall, 3),  # the Ray Data run: read → claim → engine pool → write
            "finalize_s": round(finalize_s, 3),  # merge rejects, exactly-once check
            "engine_s": round(eng.get("engine_s", 0.0), 3),
            "model_load_s": round(eng.get("model_load_s", 0.0), 3),
            "tokens_generated": int(eng.get("tokens", 0)),
            "tokens_per_s": round(eng.get("tokens", 0) / wall, 2) if wall else None,
            "engine_actors_started": int(eng.get("actors_started", 0)),
        },
    )
    runtime.write_json_atomic(manifest_path, manifest)
    return manifest


def check_resources(cfg) -> None:
    """Fail fast instead of letting Ray Data wait forever for actors that cannot start."""
    import ray

    pool = cfg.pool
    local = not cfg.ray_address
    if cfg.engine.backend == "vllm" and local:
        from cai_ray.engine.vllm import _import_vllm

        _import_vllm()  # clear EngineUnavailable when vLLM is not installed here
    have = ray.cluster_resources()
    # Actors that take every CPU leave none for the read task, and Ray Data then waits
    # forever without an error ("backpressured: ResourceBudget"). Refuse that up front.
    busiest = pool.max_actors * pool.cpus_per_actor + pool.task_cpus
    if local and busiest > have.get("CPU", 0):
        raise ValueError(
            f"{pool.max_actors} engine actors x {pool.cpus_per_actor:g} CPU + {pool.task_cpus:g} CPU "
            f"for reading/writing exceeds the {have.get('CPU', 0):g} CPUs of this machine, and the "
            "job would stall; lower pool.max_actors or give actors a fraction "
            f"(e.g. pool.cpus_per_actor={max(0.1, (have.get('CPU', 1) - pool.task_cpus) / pool.max_actors):.2f})"
        )
    for name, per_actor in (("GPU", pool.gpus_per_actor), ("CPU", pool.cpus_per_actor)):
        need = per_actor * pool.min_actors
        if need > have.get(name, 0):
            msg = (
                f"the engine pool needs {need:g} {name} ({pool.min_actors} actors x {per_actor:g}) "
                f"but the Ray cluster has {have.get(name, 0):g}"
            )
            if local:
                raise ValueError(msg + "; lower pool.min_actors / pool.*_per_actor")
            log.warning("%s; waiting for the autoscaler to add nodes", msg)


def _reasons(rejects: list[dict[str, Any]]) -> dict[str, int]:
    """Rejects counted by the kind of reason (the text before any detail)."""
    from collections import Counter

    return dict(Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejects))
