"""What every batch stage shares: ids, rejects, resume, exactly-once, manifest, the run.

    read ─► claim ids (ledger) ─► repartition to engine batches ─► [stage's actor pools] ─► sink
    PROMPT_SCHEMA                                                                         data/
                                                                                          filtered/
                                                                                          rejects.jsonl

``run_stage`` runs one stage: it writes the manifest before and after, brings up Ray,
checks the pools fit, resumes from what is already written, streams the Ray Data pipeline
built by the stage, and at the end merges the rejects, checks that every output id is
written exactly once and that ``written + rejected = read``. The SL-CAI stage (generate.py) and
the label stage (label.py) differ only in the pool(s) they put between claim and sink.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cai_ray.batch.records import reasons_count
from cai_ray.batch.storage import Store, as_store

log = logging.getLogger(__name__)

READ_BLOCK_ROWS = 4096  # lines parsed (and ids claimed) per read block


def isolate_failures(call: Callable[[list], list], items: list) -> list:
    """``call(items)``, or when it raises, ``call([item])`` for each item: a result per item,
    or the exception that item raised alone. One bad prompt (an endpoint's 400, a prompt the
    engine refuses) must not fail its whole batch. When every item of a batch of several
    fails alone too, the engine itself is broken: that is raised (Ray retries the task), not
    turned into rejects; a batch of one cannot tell, and its item gets its error. An engine
    that cannot run at all (EngineUnavailable) is always raised."""
    from cai_ray.engine import EngineUnavailable

    try:
        return call(items)
    except EngineUnavailable:
        raise
    except Exception as e:
        if len(items) == 1:
            return [e]
    out: list = []
    for item in items:
        try:
            out += call([item])
        except EngineUnavailable:
            raise
        except Exception as e:
            out.append(e)
    raise_if_all_failed(out)
    return out


def raise_if_all_failed(results: list) -> None:
    errors = [r for r in results if isinstance(r, BaseException)]
    if len(results) > 1 and len(errors) == len(results):
        raise errors[0]


def failure_reason(what: str, e: BaseException) -> str:
    return f"the engine failed on this {what}: {type(e).__name__}: {e}"[:500]


def with_reasons(table: pa.Table, reasons: list[str | None], column: str = "reject_reason") -> pa.Table:
    """``table`` with its reject_reason (or another reason) column replaced."""
    i = table.schema.get_field_index(column)
    return table.set_column(i, column, pa.array(reasons, pa.string()))


def engine_threads(backend: str, engine_kwargs: dict[str, Any], max_actors: int) -> dict[str, Any]:
    """hf and vllm on CPU: unless set, each actor gets an equal share of the node's cores."""
    if backend in ("hf", "vllm") and not engine_kwargs.get("threads"):
        return {**engine_kwargs, "threads": max(1, (os.cpu_count() or 1) // max_actors)}
    return engine_kwargs


def claim_ids(batch: pa.Table, ledger) -> pa.Table:
    """Drop ids already written by an earlier run; turn duplicate ids into rejects."""
    import ray

    from cai_ray.batch.ledger import DONE

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
def _part_name(keys: list) -> str:
    return "part-" + hashlib.sha1("\x00".join(map(str, keys)).encode()).hexdigest()[:20]


SIBLING_KEY = b"cai_ray.sibling_rows"  # parquet metadata: rows the same block wrote to the other folder


def _atomic_parquet(
    table: pa.Table, store: Store, folder: str, ids: list[str], name: str | None = None, sibling_rows: int = 0
) -> None:
    """One part, whole or not at all (storage.Store: a rename on disk, one PUT on an object store)."""
    if sibling_rows:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), SIBLING_KEY: str(sibling_rows).encode()}
        )
    store.write_table(f"{folder}/{name or _part_name(ids)}.parquet", table)


def drop_orphan_parts(out_dir, folders: tuple[str, ...]) -> list[str]:
    """A block split between data/ and filtered/ is written as two parts of one name; if a
    crash came between the two writes, the part that exists is removed so its input rows
    are redone whole instead of resuming with their other half missing."""
    if len(folders) < 2:
        return []
    store = as_store(out_dir)
    names = {folder: {p.rsplit("/", 1)[1] for p in store.parts(folder)} for folder in folders}
    dropped = []
    for folder in folders:
        for name in sorted(names[folder]):
            meta = store.read_schema(f"{folder}/{name}").metadata or {}
            if SIBLING_KEY in meta and not any(name in names[o] for o in folders if o != folder):
                store.delete(f"{folder}/{name}")
                dropped.append(f"{folder}/{name}")
    if dropped:
        log.warning(
            "removed %d half-written block parts (a crash between data/ and filtered/): %s",
            len(dropped),
            ", ".join(dropped[:5]),
        )
    return dropped


def drop_incomplete_prompts(out_dir, folders: tuple[str, ...]) -> int:
    """A prompt's pairs may be written by different write tasks; if a crash came between
    them, the prompt's written pairs are fewer than its ``prompt_pairs``. Those rows are
    removed (each part rewritten in place without them), so resume redoes the prompt whole
    instead of counting it done with pairs missing. Returns the number of prompts redone."""
    store = as_store(out_dir)
    files = output_files(store, folders)
    if not files or "prompt_pairs" not in store.read_schema(files[0]).names:
        return 0  # not a label output (or one from before the column existed)
    written: dict[str, set] = {}
    expected: dict[str, int] = {}
    for f in files:
        t = store.read_table(f, columns=["prompt_id", "id", "prompt_pairs"])
        for pid, rid, n in zip(*(t[c].to_pylist() for c in ("prompt_id", "id", "prompt_pairs"))):
            written.setdefault(pid, set()).add(rid)
            if n is not None:
                expected[pid] = n
    incomplete = {pid for pid, ids in written.items() if pid in expected and len(ids) < expected[pid]}
    if not incomplete:
        return 0
    keep = pa.array(sorted(incomplete), pa.string())
    for f in files:
        t = store.read_table(f)
        mask = pc.is_in(t["prompt_id"], value_set=keep)
        if pc.any(mask).as_py():
            # in place, same name: a part's data/ and filtered/ halves stay siblings (an empty
            # half is still written, or drop_orphan_parts would take the other for a crash)
            store.write_table(f, t.filter(pc.invert(mask)))
    log.warning(
        "resume: %d prompts had only some of their pairs written (a crash between write tasks); "
        "their pairs are redone whole: %s",
        len(incomplete),
        ", ".join(sorted(incomplete)[:5]),
    )
    return len(incomplete)


def reject_records(table: pa.Table) -> list[dict[str, Any]]:
    return [
        {"source": r["source"], "line": r["line"], "id": r["id"], "reason": r["reject_reason"], "raw": r["raw"]}
        for r in table.select(["source", "line", "id", "reject_reason", "raw"]).to_pylist()
    ]


def output_files(out_dir, folders: tuple[str, ...] = ("data",)) -> list[str]:
    """Finished parts only (temp files start with '.'), relative to the output folder."""
    store = as_store(out_dir)
    return [f for name in folders for f in store.parts(name)]


def read_output(out_dir, columns: list[str], folders: tuple[str, ...] = ("data",)) -> pa.Table | None:
    store = as_store(out_dir)
    files = output_files(store, folders)
    if not files:
        return None
    return pa.concat_tables(store.read_table(f, columns=columns) for f in files)


def existing_ids(out_dir, column: str = "id", folders: tuple[str, ...] = ("data",)) -> pa.Array:
    """Distinct input ids already in the output: what a resumed run skips."""
    table = read_output(out_dir, [column], folders)
    if table is None:
        return pa.array([], pa.string())
    return pc.unique(table[column])


def finalize_rejects(out_dir) -> list[dict[str, Any]]:
    """Merge reject parts into rejects.jsonl, sorted by (source, line); returns them."""
    store = as_store(out_dir)
    recs = []
    for p in store.parts("_rejects", ".jsonl"):
        recs += [json.loads(line) for line in store.read_text(p).splitlines() if line]
    recs.sort(key=lambda r: (r["source"], r["line"]))
    store.write_jsonl("rejects.jsonl", recs)
    return recs


def check_exactly_once(out_dir, folders: tuple[str, ...] = ("data",)) -> int:
    """Every row id in the output exactly once; returns the row count. A violation is a
    bug: raise. Counted in Arrow, so a million ids cost a few MB in the driver."""
    table = read_output(out_dir, ["id"], folders)
    if table is None:
        return 0
    ids = table["id"]
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[:5].to_pylist()
        raise RuntimeError(f"exactly-once violated in {as_store(out_dir)}: duplicate ids {dup}")
    return len(ids)


def clean_partial(out_dir, folders: tuple[str, ...] = ("data",)) -> None:
    """Remove temp files of a crashed run (a disk's; an object store has none) and the
    previous run's reject parts."""
    store = as_store(out_dir)
    for folder in (*folders, "_rejects"):
        for name in store.listdir(folder):
            if name.startswith(".") and ".tmp" in name:
                store.delete(f"{folder}/{name}")
    for part in store.parts("_rejects", ".jsonl"):
        store.delete(part)
    drop_orphan_parts(store, folders)
    drop_incomplete_prompts(store, folders)


def refuse_mixed_output(out, fingerprint: dict[str, Any]) -> None:
    """A resume must use the settings that made the existing output, or rows would mix."""
    from cai_ray.batch.storage import changed_settings

    out = as_store(out)
    if not output_files(out, ("data", "filtered")):
        return
    changed = changed_settings(out, fingerprint)
    if changed:
        raise ValueError(
            f"{out} holds output made with different settings ({', '.join(changed)}); "
            "resuming would mix them. Use a new --output, or delete the old one."
        )


# -- resources ------------------------------------------------------------------------------
@dataclass
class Pool:
    """One engine actor pool of a stage, for the resource check."""

    key: str  # its config section, e.g. "pool" or "labeler_pool"
    backend: str
    cfg: Any  # config.PoolConfig


def check_resources(pools: list[Pool], task_cpus: float, ray_address: str | None) -> None:
    """Fail fast instead of letting Ray Data wait forever for actors that cannot start."""
    import ray

    local = not ray_address
    if local and any(p.backend == "vllm" for p in pools):
        from cai_ray.engine.vllm import _import_vllm

        _import_vllm()  # clear EngineUnavailable when vLLM is not installed here
    have = ray.cluster_resources()
    # Actors that take every CPU leave none for the read task, and Ray Data then waits
    # forever without an error ("backpressured: ResourceBudget"). Refuse that up front.
    busiest = sum(p.cfg.max_actors * p.cfg.cpus_per_actor for p in pools) + task_cpus
    if local and busiest > have.get("CPU", 0):
        # rounded down, so the suggestion itself fits
        spare = max(
            0.01, math.floor(100 * (have.get("CPU", 1) - task_cpus) / sum(p.cfg.max_actors for p in pools)) / 100
        )
        names = " + ".join(f"{p.cfg.max_actors} {p.key} actors x {p.cfg.cpus_per_actor:g} CPU" for p in pools)
        keys = ", ".join(f"{p.key}.cpus_per_actor={spare:.2f}" for p in pools)
        raise ValueError(
            f"{names} + {task_cpus:g} CPU for reading/writing exceeds the {have.get('CPU', 0):g} "
            "CPUs of this machine, and the job would stall; lower max_actors or give actors a "
            f"fraction (e.g. {keys})"
        )
    for p in pools:
        for name, per_actor in (("GPU", p.cfg.gpus_per_actor), ("CPU", p.cfg.cpus_per_actor)):
            need = per_actor * p.cfg.min_actors
            if need > have.get(name, 0):
                msg = (
                    f"the {p.key} needs {need:g} {name} ({p.cfg.min_actors} actors x "
                    f"{per_actor:g}) but the Ray cluster has {have.get(name, 0):g}"
                )
                if local:
                    raise ValueError(msg + f"; lower {p.key}.min_actors / {p.key}.*_per_actor")
                log.warning("%s; waiting for the autoscaler to add nodes", msg)


def actor_pool_args(pool_cfg, backend: str | None = None) -> dict[str, Any]:
    """map_batches arguments for an engine actor pool of ``backend``."""
    from ray.data import ActorPoolStrategy

    args: dict[str, Any] = dict(
        batch_size=pool_cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=pool_cfg.min_actors, max_size=pool_cfg.max_actors),
        num_cpus=pool_cfg.cpus_per_actor,
        num_gpus=pool_cfg.gpus_per_actor or None,
    )
    if backend == "vllm":
        # Ray SIGKILLs an ending actor's child processes before any of the actor's own code
        # runs (Ray Data's teardown included): vLLM's engine core died under a live client,
        # logging EngineDeadError and resource-tracker KeyError tracebacks at the end of
        # every successful job. The engine stops its processes itself (VLLMEngine.__del__).
        args["runtime_env"] = {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "0"}}
    return args


def actor_engine_kwargs(engine_cfg) -> dict[str, Any]:
    """The engine's constructor arguments for its actors. An ``openai`` engine's API key,
    when the driver has it, travels as a Ray object (``api_key_ref``): not in the config (so
    not in any manifest), not in a runtime_env (the dashboard shows those), not on a command
    line; workers started before the key was set get it too."""
    kwargs = engine_cfg.engine_kwargs()
    key = os.environ.get(engine_cfg.api_key_env, "") if engine_cfg.backend == "openai" else ""
    if key.strip():
        import ray

        kwargs["api_key_ref"] = ray.put(key)
    return kwargs


# -- the run ----------------------------------------------------------------------------------
@dataclass
class StageRun:
    """Everything ``run_stage`` needs to know about one stage's job."""

    kind: str  # manifest "stage": generate | label | eval-answers | eval-judge
    cfg: Any  # the job's config (GenerateConfig, LabelConfig): input, output, inputs, outputs, ray_address
    fingerprint: dict[str, Any]  # settings a resume must share
    manifest_extra: dict[str, Any]  # constitution, models, ... (written before the run)
    pools: list[Pool]
    read_pool: Any  # PoolConfig whose batch_size / task_cpus / object_store_gb shape the read
    build: Callable  # (dataset, ledger) -> dataset between claim and sink
    sink: Any  # sink.StageDatasink
    id_column: str = "id"  # output column holding the input row's id (resume key)
    folders: tuple[str, ...] = ("data",)
    finish: Callable | None = None  # (out_dir, manifest) -> None: stage figures, after the checks
    prepare: tuple[Callable, dict] | None = None  # (fn, kwargs): a row-wise map fused with the read
    config: dict[str, Any] = field(default_factory=dict)


def _task_cpus(ds, cpus: float) -> None:
    """Give the repartition task ``cpus`` instead of Ray's default whole CPU.

    ``Dataset.repartition`` takes no resource arguments, and on a small node a whole CPU
    beside the actor pools' reservations stalls Ray Data (backpressured: ResourceBudget).
    A map with batch_size cannot stand in: a task merges its small output blocks, so the
    pool would get one block and one busy actor. The logical operator's remote args are
    read when the plan is built, so they are set there; on a Ray without that attribute
    the default whole CPU stays, with a warning.
    """
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    args = getattr(op, "ray_remote_args", None)
    if type(op).__name__ == "StreamingRepartition" and isinstance(args, dict):
        args["num_cpus"] = cpus
    else:  # pragma: no cover - depends on the Ray version
        log.warning("cannot set the repartition task's CPUs on this Ray version; it takes 1 CPU")


def run_stage(run: StageRun) -> dict[str, Any]:
    """Run a stage; returns the manifest. Resumable: input ids already in the output are
    skipped; rejects and counts are recomputed over the whole input. One run per output
    folder at a time (runtime.output_lock)."""
    from cai_ray import runtime

    store = Store(run.cfg.output)
    if store.remote:
        # an object store has no lock to take (no atomic create-if-absent through pyarrow)
        log.info("%s: object-store output, not locked: run one job per output at a time", store)
        return _run_stage(run, store)
    with runtime.output_lock(Path(run.cfg.output)):
        return _run_stage(run, store)


def _run_stage(run: StageRun, out: Store) -> dict[str, Any]:
    import ray
    from ray.data import DataContext
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cai_ray import runtime
    from cai_ray.batch.ledger import Ledger
    from cai_ray.batch.readers import list_input_files, read_prompts
    from cai_ray.config import to_dict

    cfg = run.cfg
    out.makedirs()
    config = run.config or to_dict(cfg)
    files = list_input_files(cfg.input)  # fail fast on a bad path
    refuse_mixed_output(out, run.fingerprint)

    manifest = runtime.base_manifest(run.kind, config)
    manifest.update(fingerprint=run.fingerprint, **run.manifest_extra, inputs=[f for f, _ in files])
    out.write_json("manifest.json", manifest)

    runtime.init_ray(cfg.ray_address)
    read_pool = run.read_pool
    check_resources(run.pools, read_pool.task_cpus, cfg.ray_address)
    clean_partial(out, run.folders)
    done = existing_ids(out, run.id_column, run.folders)
    # On the driver's node: the GCS places an actor on any node, and a ledger lost with a
    # worker node takes the row accounting with it (found with two nodes: the data finished,
    # then `ledger.report` raised ActorUnavailableError). The driver's node ending ends the job anyway.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ledger = ray.remote(num_cpus=0)(Ledger).options(scheduling_strategy=here).remote(done)
    if len(done):
        log.info("resuming: %d input rows already done in %s", len(done), out)

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    if read_pool.object_store_gb:
        # Bounds the data in flight: the pipeline streams at the same rate, and the object
        # store's resident pages stop growing with the number of rows.
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=read_pool.object_store_gb * 2**30)
    t0 = time.perf_counter()
    try:
        ds = read_prompts(
            cfg.input, cfg.inputs.max_prompt_chars, max(READ_BLOCK_ROWS, read_pool.batch_size), read_pool.task_cpus
        )
        ds = ds.map_batches(
            claim_ids,
            fn_kwargs={"ledger": ledger},
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=read_pool.task_cpus,
        )
        # An actor task handles a whole input block: blocks of one engine batch keep every
        # actor of the pool busy, and a killed actor's retry redoes one batch, not a file.
        if run.prepare is not None:  # row-wise work, fused with the read task
            fn, kwargs = run.prepare
            ds = ds.map_batches(
                fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None, num_cpus=read_pool.task_cpus
            )
        ds = ds.repartition(target_num_rows_per_block=read_pool.batch_size)
        # half the task CPUs: a different request keeps Ray from fusing the repartition into
        # the read task, whose output buffer would merge the batches back into one block
        _task_cpus(ds, read_pool.task_cpus / 2)
        ds = run.build(ds, ledger)
        ds.write_datasink(run.sink, ray_remote_args={"num_cpus": read_pool.task_cpus})
    except BaseException as e:
        manifest.update(status="failed", finished=runtime.now(), error=f"{type(e).__name__}: {e}")
        out.write_json("manifest.json", manifest)
        raise
    wall = time.perf_counter() - t0

    t1 = time.perf_counter()
    report = ray.get(ledger.report.remote())
    rejects = finalize_rejects(out)
    rows = check_exactly_once(out, run.folders)
    inputs_done = len(existing_ids(out, run.id_column, run.folders))
    finalize_s = time.perf_counter() - t1
    c = report["counts"]
    counts = {
        "read": c.get("read", 0),
        "written": c.get("done", 0) + inputs_done - len(done),
        "written_this_run": inputs_done - len(done),
        "already_done": c.get("done", 0),
        "rejected": len(rejects),
        "rows_in_output": rows,
    }
    # Every input row is written (now or by an earlier run) or rejected: never dropped.
    if counts["read"] != counts["written"] + counts["rejected"]:
        raise RuntimeError(f"row accounting does not add up (a row was lost): {counts}")
    eng = report["engine"]
    manifest.update(
        status="finished",
        finished=runtime.now(),
        counts=counts,
        rejects_by_reason=reasons_count(rejects),
        timing={
            "wall_s": round(wall, 3),  # the Ray Data run: read → claim → engine pools → write
            "finalize_s": round(finalize_s, 3),  # merge rejects, exactly-once check
            "engine_s": round(eng.get("engine_s", 0.0), 3),
            "model_load_s": round(eng.get("model_load_s", 0.0), 3),
            "tokens_generated": int(eng.get("tokens", 0)),
            "tokens_per_s": round(eng.get("tokens", 0) / wall, 2) if wall else None,
            "engine_actors_started": int(eng.get("actors_started", 0)),
            # stage-specific figures the actors reported (e.g. labeler_s, comparisons)
            **{
                k: round(v, 3)
                for k, v in eng.items()
                if k not in ("engine_s", "model_load_s", "tokens", "actors_started")
            },
        },
    )
    if run.finish is not None:
        run.finish(out, manifest)
    out.write_json("manifest.json", manifest)
    return manifest
