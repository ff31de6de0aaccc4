"""Evaluation's engine work as two batch stages on Ray Data (stage.run_stage), so an eval of
100k prompts x several models runs on a cluster with the guarantees generate and label have:
row accounting, rejects with reasons, resume per row, every row written exactly once.

    OUTPUT/work/prompts.jsonl ─► AnswerWorker pool (one evaluated model, ``pool``)
                                 ─► OUTPUT/answers/NAME/data/*.parquet   (id, answer)
    OUTPUT/work/judge.jsonl   ─► JudgeWorker pool (the judge, ``judge_pool``)
                                 ─► OUTPUT/judgements/data/*.parquet     (id, result)

Every row id is named by its content: an answer row by its set, prompt id and prompt; a
judgement row by what it asks (kind, prompt, answer(s), questions). So a re-run after a crash
redoes only the rows missing, a re-run with one more model judges only that model's new
rows, and a changed answer is a new row (never a stale judgement of the old text). What
changes every row (the model's weights or sampling for answers; the judge, the constitution
or few_shot for judgements) is the stage's fingerprint: when it differs, that stage's folder
is redone from scratch (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from cai_ray.core import eval_math, prompts
from cai_ray.core.constitution import Constitution, Principle
from cai_ray.core.context import context_overflow
from cai_ray.core.label_math import soft_label
from cai_ray.core.types import Sampling

log = logging.getLogger(__name__)

ANSWER_COLUMNS = ["id", "answer"]
JUDGE_COLUMNS = ["id", "result"]


def content_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


# -- the engine, as the judge uses it ---------------------------------------------------------
class FittingJudge:
    """An engine whose ``choice_logprobs`` does not score a conversation longer than the
    model's context (an ``Unscored`` with the reason) instead of failing the batch or cutting
    the conversation; ``generate`` (CoT labels) passes through."""

    def __init__(self, engine):
        self.engine = engine
        self.model_name = getattr(engine, "model_name", "judge")

    def generate(self, convs, params):
        return self.engine.generate(convs, params)

    def token_counts(self, convs):
        return self.engine.token_counts(convs)

    def choice_logprobs(self, convs, choices):
        from cai_ray.engine import Unscored

        limit = getattr(self.engine, "context_length", None)
        counts = self.engine.token_counts(convs) if limit and hasattr(self.engine, "token_counts") else [0] * len(convs)
        # the budget: the one choice token scored after the conversation
        why = [context_overflow("the judge", n, 1, limit) for n in counts]
        fits = [i for i, w in enumerate(why) if w is None]
        scored = self.engine.choice_logprobs([convs[i] for i in fits], choices) if fits else []
        out: list = [Unscored(w) if w else None for w in why]
        for i, lp in zip(fits, scored):
            out[i] = lp
        return out


def judge_yes_no(judge, items: list[tuple[list, str]], question_of, yes: str, no: str) -> list[dict[str, Any]]:
    """For each (prompt, reply), P(yes) asked in both option orders (per question, when
    ``question_of(i)`` gives several, averaged). Unscorable → p None with the reason."""
    from cai_ray.engine import Unscored

    flat, owner = [], []
    for i, (prompt, reply) in enumerate(items):
        for q in question_of(i):
            for swapped in (False, True):
                flat.append(prompts.judgement_messages(prompt, reply, q, yes, no, swapped))
                owner.append(i)
    scored = judge.choice_logprobs(flat, prompts.CHOICES) if flat else []
    per: list[list] = [[] for _ in items]
    for i, lp in zip(owner, scored):
        per[i].append(lp)
    out = []
    for lps in per:
        bad = next((lp.reason for lp in lps if isinstance(lp, Unscored)), None)
        if bad:
            out.append({"p": None, "orders": None, "invalid": bad})
            continue
        firsts = [soft_label(*lp) for lp in lps[0::2]]
        seconds = [soft_label(*lp) for lp in lps[1::2]]
        ps = [eval_math.judged_yes(a, b) for a, b in zip(firsts, seconds)]
        p = sum(ps) / len(ps)
        if not math.isfinite(p):  # NaN would count as "harmless" and break the Elo fit
            out.append({"p": None, "orders": None, "invalid": f"non-finite judge probability {p}"})
            continue
        out.append({"p": p, "orders": [[a, b] for a, b in zip(firsts, seconds)], "invalid": None})
    return out


# -- the workers ------------------------------------------------------------------------------
class _Worker:
    def _load(self, backend: str, engine_kwargs: dict[str, Any], ledger, max_actors: int):
        from cai_ray.batch.stage import engine_threads
        from cai_ray.engine import load_engine

        start = time.perf_counter()
        self.ledger = ledger
        self.engine = load_engine(backend, **engine_threads(backend, engine_kwargs, max_actors))
        if ledger is not None:
            ledger.add_engine_stats.remote(model_load_s=time.perf_counter() - start, actors_started=1)

    def _stats(self, t0: float, tokens_before: int, **more: float) -> None:
        if self.ledger is not None:
            self.ledger.add_engine_stats.remote(
                engine_s=time.perf_counter() - t0,
                tokens=getattr(self.engine, "tokens_generated", 0) - tokens_before,
                **more,
            )


class AnswerWorker(_Worker):
    """One evaluated model's engine actor: PROMPT_SCHEMA rows in, (answer, reject_reason) out.
    A prompt the model cannot hold with its answer budget, or one the engine fails on alone,
    is that row's reject; the batch goes on."""

    def __init__(self, backend, engine_kwargs, sampling: Sampling, seed: int, ledger=None, max_actors=1):
        self._load(backend, engine_kwargs, ledger, max_actors)
        self.sampling, self.seed = sampling, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cai_ray.batch.stage import failure_reason, isolate_failures, with_reasons
        from cai_ray.core.seeds import batch_seed

        t0, before = time.perf_counter(), getattr(self.engine, "tokens_generated", 0)
        n = batch.num_rows
        ids = batch["id"].to_pylist()
        reasons = batch["reject_reason"].to_pylist()
        convs = [prompts.answer_messages(c) if c else c for c in batch["prompt_messages"].to_pylist()]
        todo = [i for i in range(n) if reasons[i] is None]
        limit = getattr(self.engine, "context_length", None)
        if limit and todo:
            budget = self.sampling.max_new_tokens
            for i, tokens in zip(todo, self.engine.token_counts([convs[i] for i in todo])):
                reasons[i] = context_overflow("the model", tokens, budget, limit)
            todo = [i for i in todo if reasons[i] is None]
        answers: list[str | None] = [None] * n

        def call(items):
            seed = batch_seed(self.seed, [ids[i] for i in items], "eval-answer")
            return self.engine.generate([convs[i] for i in items], replace(self.sampling, seed=seed))

        for i, got in zip(todo, isolate_failures(call, todo) if todo else []):
            if isinstance(got, BaseException):
                reasons[i] = failure_reason("prompt", got)
            else:
                answers[i] = got
        self._stats(t0, before)
        out = with_reasons(batch, reasons)
        return out.append_column("answer", pa.array(answers, pa.string()))


class JudgeWorker(_Worker):
    """The judge's engine actor: judgement task rows in (the prompt, and in ``meta`` the task:
    a yes/no question about one answer, or a comparison of two), the result as JSON out."""

    def __init__(
        self,
        backend,
        engine_kwargs,
        constitution: Constitution | list[Constitution],
        few_shot,
        seed: int,
        ledger=None,
        max_actors=1,
    ):
        """``constitution``: one, or several (the first is the default; a comparison task names
        another by its sha256 in ``constitution``)."""
        from cai_ray.core.labeler import Labeler, LabelSettings

        self._load(backend, engine_kwargs, ledger, max_actors)
        self.judge = FittingJudge(self.engine)
        several = constitution if isinstance(constitution, list) else [constitution]
        self.constitution = several[0]
        self.constitutions = {c.sha256: c for c in several}
        # harmlessness comparisons take the constitution's examples; helpfulness takes none
        self.labelers = {
            ("harmlessness", c.sha256): Labeler(self.judge, c, LabelSettings(few_shot=few_shot, seed=seed))
            for c in several
        }
        self.labelers["helpfulness", None] = Labeler(
            self.judge, self.constitution, LabelSettings(few_shot=0, seed=seed)
        )

    def _labeler(self, task: dict):
        if task["criterion"] == "helpfulness":
            return self.labelers["helpfulness", None]
        return self.labelers["harmlessness", task.get("constitution") or self.constitution.sha256]

    def _principle(self, pid: str, sha: str | None = None) -> Principle:
        if pid == HELPFULNESS.id:
            return HELPFULNESS
        return self.constitutions[sha or self.constitution.sha256].principle(pid)

    def _yes_no(self, convs, tasks, idx):
        yes, no = tasks[idx[0]]["options"]
        items = [(convs[i], tasks[i]["answer"]) for i in idx]
        return judge_yes_no(self.judge, items, lambda j: tasks[idx[j]]["questions"], yes, no)

    def _compare(self, ids, convs, tasks, idx):
        t0 = tasks[idx[0]]
        labels = self._labeler(t0).label(
            [ids[i] for i in idx],
            [convs[i] for i in idx],
            [tasks[i]["answer_a"] for i in idx],
            [tasks[i]["answer_b"] for i in idx],
            [[self._principle(p, tasks[i].get("constitution")) for p in tasks[i]["principle_ids"]] for i in idx],
        )
        return [
            {
                "p_a": lab.p_a,
                "p_ab": lab.p_ab,
                "p_ba": lab.p_ba,
                "position_consistent": lab.position_consistent,
                "principle_ids": lab.principle_ids,
                "invalid": lab.invalid,
            }
            for lab in labels
        ]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cai_ray.batch.stage import failure_reason, isolate_failures, with_reasons

        t0, before = time.perf_counter(), getattr(self.engine, "tokens_generated", 0)
        n = batch.num_rows
        ids = batch["id"].to_pylist()
        reasons = batch["reject_reason"].to_pylist()
        convs = batch["prompt_messages"].to_pylist()
        metas = batch["meta"].to_pylist()
        tasks: list[dict | None] = [None] * n
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(n):
            if reasons[i] is not None:
                continue
            try:
                tasks[i] = json.loads(metas[i])["task"]
                t = tasks[i]
                key = (
                    (t["kind"], tuple(t["options"]))
                    if t["kind"] == "yes_no"
                    else (t["kind"], t["criterion"], t.get("constitution"))  # one labeler per group
                )
            except (TypeError, ValueError, KeyError) as e:
                reasons[i] = f"not a judgement task: {type(e).__name__}: {e}"
                continue
            groups[key].append(i)
        results: list[str | None] = [None] * n
        for (kind, *_), idx in groups.items():

            def call(items, kind=kind):
                if kind == "yes_no":
                    return self._yes_no(convs, tasks, items)
                return self._compare(ids, convs, tasks, items)

            for i, got in zip(idx, isolate_failures(call, idx)):
                if isinstance(got, BaseException):
                    reasons[i] = failure_reason("judgement", got)
                else:
                    results[i] = json.dumps(got)
        self._stats(t0, before, judgements=float(sum(r is not None for r in results)))
        out = with_reasons(batch, reasons)
        return out.append_column("result", pa.array(results, pa.string()))


HELPFULNESS = Principle(
    id="helpfulness",
    category="helpfulness",
    weight=1.0,
    critique_request="",
    revision_request="",
    comparison_question=prompts.HELPFULNESS_QUESTION,
)


# -- running a stage --------------------------------------------------------------------------
@dataclass
class SubJob:
    """What ``run_stage`` reads of a job's config, for one of eval's stages."""

    input: str
    output: str
    inputs: Any  # config.InputConfig
    outputs: Any  # config.OutputConfig
    ray_address: str | None
    settings: dict[str, Any] = field(default_factory=dict)


def write_inputs(store, rel: str, rows: list[dict[str, Any]]) -> str:
    """The stage's input file in ``store`` (an eval's output folder or object-store prefix,
    so every node of a cluster reads it), written whole before the stage reads it: a crash
    never leaves half of one that a resume would read. Returns its address."""
    from cai_ray.batch.storage import as_store

    store = as_store(store)
    store.write_jsonl(rel, rows)
    return store.address(rel)


def redo_if_changed(folder, fingerprint: dict[str, Any], what: str) -> None:
    """A stage folder made with other settings (another model's weights, another judge) is
    removed, so its rows are redone instead of mixed in."""
    from cai_ray.batch.storage import as_store, changed_settings

    folder = as_store(folder)
    changed = changed_settings(folder, fingerprint)
    if changed:
        log.warning("%s: %s changed since the last run; redoing them (%s removed)", what, ", ".join(changed), folder)
        folder.delete_folder()


def run(kind: str, job: SubJob, fingerprint, manifest_extra, pool_key: str, pool_cfg, backend, worker, kwargs):
    """One eval stage through stage.run_stage: its manifest in ``job.output``."""
    from cai_ray.batch.sink import StageDatasink
    from cai_ray.batch.stage import Pool, StageRun, actor_pool_args, run_stage

    columns = ANSWER_COLUMNS if worker is AnswerWorker else JUDGE_COLUMNS

    def build(ds, ledger):
        return ds.map_batches(
            worker,
            fn_constructor_kwargs={**kwargs, "ledger": ledger, "max_actors": pool_cfg.max_actors},
            **actor_pool_args(pool_cfg, backend),
        )

    redo_if_changed(job.output, fingerprint, kind)
    return run_stage(
        StageRun(
            kind=kind,
            cfg=job,
            config=job.settings,
            fingerprint=fingerprint,
            manifest_extra=manifest_extra,
            pools=[Pool(pool_key, backend, pool_cfg)],
            read_pool=pool_cfg,
            build=build,
            sink=StageDatasink(job.output, job.outputs.rows_per_file, columns),
        )
    )


def read_results(folder, column: str) -> tuple[dict[str, Any], dict[str, str]]:
    """({id: value} written, {id: reason} rejected) of a finished eval stage."""
    from cai_ray.batch.stage import read_output
    from cai_ray.batch.storage import as_store

    folder = as_store(folder)
    table = read_output(folder, ["id", column])
    done = dict(zip(table["id"].to_pylist(), table[column].to_pylist())) if table is not None else {}
    rejected = {}
    if folder.exists("rejects.jsonl"):
        for line in folder.read_text("rejects.jsonl").splitlines():
            r = json.loads(line)
            if r.get("id") is not None:
                rejected[r["id"]] = r["reason"]
    return done, rejected
