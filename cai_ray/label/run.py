"""RL-CAI preference labels (RLAIF) on Ray Data, the way the CAI and RLAIF papers make them.

    read ─► claim ─► to_pair_rows ─► [PairSampler: policy pool] ─► LabelWorker: labeler pool ─► sink
                                      (only for prompt rows)                                    data/      kept labels
                                                                                                filtered/  low margin, inconsistent, invalid
                                                                                                rejects.jsonl

For each pair, K principles are drawn (seeded by the pair id, distinct). Each principle's
comparison question is asked in both orders; the soft label of one comparison is
P("A") / (P("A") + P("B")) after "The answer is: (" (``engine.choice_logprobs``). In order
BA the probability of response_a is 1 - P("A"). Per order the principles are averaged
(ensemble), then the two orders (position debiasing): ``p_a = (p_ab + p_ba) / 2``.

In chain-of-thought mode the labeler first writes its reasoning (which must end in a
choice, parsed strictly: anything else marks the pair invalid, with the reason); the
reasoning minus its final answer line is then continued with "The answer is: (" and
scored, and each probability is clamped to [clamp_low, clamp_high] (CAI paper: 0.4-0.6).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from cai_ray.batch.records import LABEL_OUTPUT_COLUMNS, LABEL_SCHEMA, append_message
from cai_ray.batch.stage import engine_threads, failure_reason, isolate_failures
from cai_ray.core import label_math, prompts
from cai_ray.core.constitution import Constitution, ConstitutionRouter, constitution_id
from cai_ray.core.context import context_overflow
from cai_ray.core.labeler import PAIR_LABEL_COLUMNS, Labeler, LabelSettings, PairLabel
from cai_ray.engine import Sampling, load_engine
from cai_ray.plots import reliability_diagram

log = logging.getLogger(__name__)


def filter_reason(label: PairLabel, min_margin: float, drop_inconsistent: bool) -> str | None:
    """Why a labelled pair goes to filtered/ instead of data/ (None = kept)."""
    if label.invalid is not None:
        return label.invalid
    if label.p_a is None or not math.isfinite(label.p_a):
        return f"non-finite label p_a={label.p_a}"  # NaN passes every comparison below
    margin = abs(label.p_a - 0.5)
    if margin < min_margin:
        return f"low margin: |p_a - 0.5| = {margin:.3f} < filter.min_margin {min_margin}"
    if drop_inconsistent and label.position_consistent is False:
        return "position-inconsistent: the two orders prefer different responses"
    return None


class LabelWorker:
    """Labeler actor: PAIR_SCHEMA table in, LABEL_SCHEMA table out. ``constitution`` is one
    Constitution or a ConstitutionRouter (a constitution per value of a row field)."""

    def __init__(
        self,
        backend: str,
        engine_kwargs: dict[str, Any],
        constitution: Constitution | ConstitutionRouter,
        settings: LabelSettings,
        min_margin: float,
        drop_inconsistent: bool,
        ledger=None,
        max_actors: int = 1,
    ):
        start = time.perf_counter()
        engine = load_engine(backend, **engine_threads(backend, engine_kwargs, max_actors))
        self.router = constitution if isinstance(constitution, ConstitutionRouter) else ConstitutionRouter(constitution)
        self.labelers = {c.sha256: Labeler(engine, c, settings) for c in self.router.all}
        self.labeler = self.labelers[self.router.default.sha256]
        self.min_margin, self.drop_inconsistent = min_margin, drop_inconsistent
        self.ledger = ledger
        self.overhead = max(self._template_overhead(lab) for lab in self.labelers.values())
        if ledger is not None:
            ledger.add_engine_stats.remote(model_load_s=time.perf_counter() - start, actors_started=1)

    def _template_overhead(self, labeler: Labeler) -> int:
        """Tokens a comparison adds around (prompt + both responses): few-shot turns, the
        longest question, markup; measured once, so rows are counted without the shots."""
        eng = labeler.engine
        longest = max(labeler.constitution.principles, key=lambda p: len(p.comparison_question))
        full = prompts.comparison_messages(labeler.shots, [prompts.user("x")], "y", "z", longest, cot=labeler.s.cot)
        with_template, bare = eng.token_counts([full, [prompts.user("x y z")]])
        return with_template - bare + 8  # + a margin for merges at message boundaries

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        n = batch.num_rows
        reasons = batch["reject_reason"].to_pylist()
        todo = [i for i in range(n) if reasons[i] is None]
        ids = batch["id"].to_pylist()
        convs_all = batch["prompt_messages"].to_pylist()
        a_all, b_all = batch["response_a"].to_pylist(), batch["response_b"].to_pylist()
        metas = batch["meta"].to_pylist()
        labeler_of = [self.labelers[self.router.of_meta(m).sha256] for m in metas]
        eng = self.labeler.engine
        unlabelled: dict[int, str] = {}
        if todo:
            probe = [convs_all[i] + [prompts.assistant(a_all[i]), prompts.user(b_all[i])] for i in todo]
            budget = self.labeler.budget
            for i, tokens in zip(todo, eng.token_counts(probe)):
                why = context_overflow("the labeler", tokens + self.overhead, budget, eng.context_length)
                if why:
                    unlabelled[i] = f"invalid: {why}"
        go = [i for i in todo if i not in unlabelled]
        by_row: dict[int, Any] = {}
        for lab in self.labelers.values():  # each constitution labels its own rows
            mine = [i for i in go if labeler_of[i] is lab]
            if not mine:
                continue
            results = isolate_failures(
                lambda rows, lab=lab: lab.label(
                    [ids[i] for i in rows],
                    [convs_all[i] for i in rows],
                    [a_all[i] for i in rows],
                    [b_all[i] for i in rows],
                ),
                mine,
            )
            for i, r in zip(mine, results):
                if isinstance(r, BaseException):
                    unlabelled[i] = f"invalid: {failure_reason('pair', r)}"
                by_row[i] = r

        cols: dict[str, list] = {
            k: [None] * n
            for k in (*PAIR_LABEL_COLUMNS, "p_chosen", "filter_reason", "labeler", "template_sha256", "constitution")
        }
        chosen_text, rejected_text, has_choice = [None] * n, [None] * n, [False] * n
        for i in todo:
            cols["labeler"][i] = eng.model_name
            cols["template_sha256"][i] = labeler_of[i].template_sha256
            cols["constitution"][i] = constitution_id(labeler_of[i].constitution)
            if i in unlabelled:
                cols["filter_reason"][i] = unlabelled[i]
                continue
            lab = by_row[i]
            for k in PAIR_LABEL_COLUMNS:
                cols[k][i] = getattr(lab, k)
            cols["filter_reason"][i] = filter_reason(lab, self.min_margin, self.drop_inconsistent)
            if lab.p_a is not None:
                a_wins = lab.p_a >= 0.5
                cols["p_chosen"][i] = lab.p_a if a_wins else 1 - lab.p_a
                chosen_text[i], rejected_text[i] = (a_all[i], b_all[i]) if a_wins else (b_all[i], a_all[i])
                has_choice[i] = True
        out = batch
        for name in cols:
            out = out.append_column(LABEL_SCHEMA.field(name), pa.array(cols[name], LABEL_SCHEMA.field(name).type))
        out = out.append_column(
            LABEL_SCHEMA.field("chosen"), append_message(batch["prompt_messages"], "assistant", chosen_text, has_choice)
        )
        out = out.append_column(
            LABEL_SCHEMA.field("rejected"),
            append_message(batch["prompt_messages"], "assistant", rejected_text, has_choice),
        )
        if self.ledger is not None:
            self.ledger.add_engine_stats.remote(
                engine_s=time.perf_counter() - t0,
                labeler_s=time.perf_counter() - t0,
                comparisons=sum(lab.comparisons for lab in self.labelers.values()),
            )
            for lab in self.labelers.values():
                lab.comparisons = 0
        return out.select(LABEL_SCHEMA.names)


def review_queue(out, router: ConstitutionRouter, review) -> dict[str, Any]:
    """review/queue.jsonl: the labels the AI is least sure of, for people (core/review.py;
    `cai-ray review` serves it). A re-run writes the queue again, keeping every pair people
    already labelled (their labels, review/labels.jsonl, are never touched), and reports the
    AI-vs-human agreement so far. Returns the manifest's figures."""
    from cai_ray.batch.stage import read_output
    from cai_ray.batch.storage import as_store
    from cai_ray.core.review import COLUMNS, ai_vs_human, build_queue, human_labels, read_queue

    store = as_store(out)
    table = read_output(out, COLUMNS, ("data", "filtered"))
    rows = table.to_pylist() if table is not None else []
    queue = build_queue(rows, {constitution_id(c): c for c in router.all}, review)
    labelled = {} if store.remote else human_labels(store.local())  # people review a local folder
    if labelled:
        have = {q["pair_id"] for q in queue}
        queue += [q for q in read_queue(store.local()) if q["pair_id"] in labelled and q["pair_id"] not in have]
    store.write_jsonl("review/queue.jsonl", queue)
    counts: dict[str, int] = {}
    for q in queue:
        for r in q["reasons"]:
            kind = r.split(":")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return {
        "queued": len(queue),
        "of_pairs": len(rows),
        "by_reason": counts,
        "queue": store.address("review/queue.jsonl"),
        "agreement": ai_vs_human({q["pair_id"]: q for q in queue}, labelled) if labelled else None,
    }


# -- quality ----------------------------------------------------------------------------------
def label_quality_by_constitution(out) -> dict[str, dict[str, Any]]:
    """``label_quality`` per constitution (the rows' ``constitution`` id), side by side."""
    from cai_ray.batch.stage import read_output

    cols = ["p_a", "p_ab", "p_ba", "position_consistent", "filter_reason", "constitution"]
    table = read_output(out, cols, ("data", "filtered"))
    rows = table.to_pylist() if table is not None else []
    return {
        c: label_quality(out, [r for r in rows if r["constitution"] == c])
        for c in sorted({r["constitution"] for r in rows})
    }


def label_quality(out, rows: list[dict] | None = None) -> dict[str, Any]:
    """Labeler figures over the whole output (data/ and filtered/), so a resumed run reports
    the same numbers as a single one; or over ``rows`` when given."""
    from cai_ray.batch.stage import read_output

    if rows is None:
        table = read_output(out, ["p_a", "p_ab", "p_ba", "position_consistent", "filter_reason"], ("data", "filtered"))
        rows = table.to_pylist() if table is not None else []
    labelled = [r for r in rows if r["p_a"] is not None]
    both = [r for r in labelled if r["p_ba"] is not None]
    kinds: dict[str, int] = {}
    for r in rows:
        if r["filter_reason"]:
            kind = r["filter_reason"].split(":")[0].split(" (")[0]
            kinds[kind] = kinds.get(kind, 0) + 1

    def mean(xs):
        xs = list(xs)
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "pairs": len(rows),
        "labels": len(labelled),
        "kept": sum(1 for r in rows if not r["filter_reason"]),
        "filtered": kinds,
        "invalid": sum(v for k, v in kinds.items() if k.startswith("invalid")),
        "mean_margin": mean(abs(r["p_a"] - 0.5) for r in labelled),
        "position_consistent_share": mean(1.0 if r["position_consistent"] else 0.0 for r in both),
        # mean probability given to whichever response was shown first; 0.5 = no bias
        "position_bias": mean(
            ((r["p_ab"] + 1 - r["p_ba"]) / 2) if r["p_ba"] is not None else r["p_ab"] for r in labelled
        ),
    }


def gold_metrics(gold_out: Path, folder: Path, bins: int = 10) -> dict[str, Any]:
    """Accuracy, ECE and a reliability diagram of the labeler on the gold pairs."""
    from cai_ray.batch.stage import read_output

    table = read_output(gold_out, ["p_a", "meta", "filter_reason"], ("data", "filtered"))
    rows = table.to_pylist() if table is not None else []
    probs, outcomes, invalid = [], [], 0
    for r in rows:
        if r["p_a"] is None:
            invalid += 1
            continue
        probs.append(r["p_a"])
        outcomes.append(int(json.loads(r["meta"])["gold_a"]))
    correct = sum(1 for p, y in zip(probs, outcomes) if (p > 0.5 and y == 1) or (p < 0.5 and y == 0))
    ties = sum(1 for p in probs if p == 0.5)
    png = folder / "reliability.png"
    if probs:
        reliability_diagram(probs, outcomes, png, bins)
    return {
        "gold_pairs": len(rows),
        "labelled": len(probs),
        "invalid": invalid,
        "accuracy": round(correct / len(probs), 4) if probs else None,  # ties (p = 0.5) count as wrong
        "ties": ties,
        "ece": round(label_math.expected_calibration_error(probs, outcomes, bins), 4) if probs else None,
        "reliability_png": str(png) if probs else None,
    }


def write_gold_pairs(gold: str, dest: Path, max_chars: int, seed: int) -> int:
    """The gold file (prompt|messages, chosen, rejected) as ready-made pairs, the known
    winner placed as response_a or response_b by a seeded hash of the row id (so about
    half each, and a position bias cannot pass for accuracy). Bad gold rows are an error."""
    import hashlib

    from cai_ray.batch.readers import InputError, read_local

    table = read_local(gold, max_chars)
    problems, rows = [], []
    for r in table.to_pylist():
        where = f"{r['source']}:{r['line']}"
        if r["reject_reason"]:
            problems.append(f"{where}: {r['reject_reason']}")
            continue
        meta = json.loads(r["meta"]) if r["meta"] else {}
        ch, rj = meta.get("chosen"), meta.get("rejected")
        if not (isinstance(ch, str) and ch.strip() and isinstance(rj, str) and rj.strip()):
            problems.append(f"{where}: a gold row needs non-empty string fields 'chosen' and 'rejected'")
            continue
        a_first = hashlib.blake2b(f"{seed}\x00{r['id']}".encode(), digest_size=1).digest()[0] % 2 == 0
        rows.append(
            {
                "id": r["id"],
                "messages": r["prompt_messages"],
                "response_a": ch if a_first else rj,
                "response_b": rj if a_first else ch,
                "gold_a": 1 if a_first else 0,
            }
        )
    if problems:
        raise InputError(f"--gold {gold}: {len(problems)} bad rows: " + "; ".join(problems[:5]))
    if not rows:
        raise InputError(f"--gold {gold}: no rows")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


# -- the job ----------------------------------------------------------------------------------
def load_router(cfg) -> ConstitutionRouter:
    """The run's constitutions: ``constitution``, and with ``constitution_field`` one per value."""
    return ConstitutionRouter.load(cfg.constitution, cfg.constitution_field, cfg.constitutions)


def label_fingerprint(config: dict[str, Any], constitution: Constitution, router=None) -> dict[str, Any]:
    return {
        "policy": config["policy"]["model"] or None,
        "labeler": config["labeler"]["model"],
        "constitution_sha256": constitution.sha256,
        # several constitutions: which field picks them and each value's (a changed file redoes the run)
        **(
            {"constitution_field": router.field, "constitutions": {v: c.sha256 for v, c in sorted(router.by.items())}}
            if router is not None and router.field
            else {}
        ),
        "seed": config["seed"],
        "sampling": config["sampling"] if config["policy"]["model"] else None,
        "pairs": config["pairs"] if config["policy"]["model"] else None,
        "label": config["method"],  # the key outputs made before the rename recorded
        "filter": config["filter"],
    }


def settings_from(cfg) -> LabelSettings:
    """The LabelSettings of a config with ``label`` (LabelerConfig) and ``seed``."""
    return LabelSettings.of(cfg.method, cfg.seed)


def label(cfg) -> dict[str, Any]:
    """Run the label stage described by a ``LabelConfig``; returns the manifest (with the
    labeler's quality figures, and gold accuracy/calibration when ``cfg.gold`` is set)."""
    from cai_ray.batch.readers import list_input_files
    from cai_ray.batch.sink import StageDatasink
    from cai_ray.batch.stage import Pool, StageRun, actor_engine_kwargs, actor_pool_args, run_stage
    from cai_ray.config import to_dict
    from cai_ray.label.pairs import PairSampler, to_pair_rows
    from cai_ray.models import model_info

    config = to_dict(cfg)
    router = load_router(cfg)
    constitution = router.default
    if cfg.gold:
        list_input_files(cfg.gold)  # a missing gold file fails before the run, not after it
    settings = settings_from(cfg)
    shots = prompts.comparison_shots(constitution, settings.few_shot, settings.cot)
    template = prompts.template_sha256(shots, settings.cot)
    pools = [Pool("labeler_pool", cfg.labeler.backend, cfg.labeler_pool)]
    models = {"labeler": model_info(cfg.labeler.model, cfg.labeler.backend, cfg.labeler.base_url)}
    if cfg.samples_answers:
        pools.insert(0, Pool("policy_pool", cfg.policy.backend, cfg.policy_pool))
        models["policy"] = model_info(cfg.policy.model, cfg.policy.backend, cfg.policy.base_url)

    def build(ds, ledger):
        if cfg.samples_answers:
            ds = ds.map_batches(
                PairSampler,
                fn_constructor_kwargs=dict(
                    backend=cfg.policy.backend,
                    engine_kwargs=actor_engine_kwargs(cfg.policy),
                    samples=cfg.pairs.samples,
                    pairing=cfg.pairs.pairing,
                    sampling=Sampling.of(cfg.sampling),
                    seed=cfg.seed,
                    ledger=ledger,
                    max_actors=cfg.policy_pool.max_actors,
                ),
                **actor_pool_args(cfg.policy_pool, cfg.policy.backend),
            )
        return ds.map_batches(
            LabelWorker,
            fn_constructor_kwargs=dict(
                backend=cfg.labeler.backend,
                engine_kwargs=actor_engine_kwargs(cfg.labeler),
                constitution=router,
                settings=settings,
                min_margin=cfg.filter.min_margin,
                drop_inconsistent=cfg.filter.drop_inconsistent,
                ledger=ledger,
                max_actors=cfg.labeler_pool.max_actors,
            ),
            **actor_pool_args(cfg.labeler_pool, cfg.labeler.backend),
        )

    def finish(out: Path, manifest: dict[str, Any]) -> None:
        manifest["labels"] = label_quality(out)
        if router.field:
            manifest["labels_by_constitution"] = label_quality_by_constitution(out)
        if cfg.review.fraction > 0 and cfg.review.max_rows > 0:
            manifest["review"] = review_queue(out, router, cfg.review)
        t = manifest["timing"]
        if t["wall_s"]:
            # share of the run's wall time the labeler actors spent inside their engine calls
            t["labeler_busy_share"] = round(t.get("labeler_s", 0.0) / (t["wall_s"] * cfg.labeler_pool.max_actors), 3)
            t["labels_per_s"] = round(manifest["labels"]["labels"] / t["wall_s"], 3)

    run = StageRun(
        kind="label",
        cfg=cfg,
        config=config,
        fingerprint=label_fingerprint(config, constitution, router),
        manifest_extra=dict(
            constitution=constitution.summary(),
            **(
                {"constitutions": {v: c.summary() for v, c in router.by.items()}, "constitution_field": router.field}
                if router.field
                else {}
            ),
            models=models,
            template_sha256=template,
        ),
        pools=pools,
        read_pool=cfg.labeler_pool,
        build=build,
        sink=StageDatasink(cfg.output, cfg.outputs.rows_per_file, LABEL_OUTPUT_COLUMNS, filter_column="filter_reason"),
        id_column="prompt_id",
        folders=("data", "filtered"),
        finish=finish,
        prepare=(to_pair_rows, {"max_chars": cfg.inputs.max_prompt_chars, "can_sample": cfg.samples_answers}),
    )
    manifest = run_stage(run)
    if cfg.gold:
        manifest["gold"] = label_gold(cfg, Path(cfg.output))
        from cai_ray import runtime

        runtime.write_json_atomic(Path(cfg.output) / "manifest.json", manifest)
    return manifest


def label_gold(cfg, out: Path) -> dict[str, Any]:
    """Label the gold pairs with the same labeler and method into OUT/gold/, unfiltered."""
    import dataclasses

    from cai_ray.label.config import FilterConfig

    gold_dir = out / "gold"
    pairs_file = gold_dir / "input" / "pairs.jsonl"
    write_gold_pairs(cfg.gold, pairs_file, cfg.inputs.max_prompt_chars, cfg.seed)
    gold_cfg = dataclasses.replace(
        cfg,
        input=str(pairs_file),
        output=str(gold_dir / "labels"),
        gold=None,
        policy=dataclasses.replace(cfg.policy, model=""),
        filter=FilterConfig(),
    )
    gold_cfg.validate()
    label(gold_cfg)
    metrics = gold_metrics(gold_dir / "labels", out)
    metrics.update(file=cfg.gold, labels=str(gold_dir / "labels"))
    return metrics
