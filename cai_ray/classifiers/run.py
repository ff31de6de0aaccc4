"""`cai-ray classifiers`: the job, in the order of the method.

    1 requests   generator pool (Ray Data): per principle × role × i, a user request
    2 answers    generator pool: answers that violate / respect the principle; the eval sets' answers
    3 judge      judge pool: P(violates) of every row (request or answer) under its principle
    4 targets    the role, unless the judge confidently contradicts it (filtered.jsonl); split by id
    5 train      input and output classifiers on Ray Train (train step's ``classifier`` trainer)
    6 measure    AUROC and FPR at ``recall`` on held-out rows (which fixes each threshold) and on
                 the red-team / benign eval sets, with bootstrap intervals → metrics.json, guard.json

Stages 1-3 are eval's engine stages (rows named by content, resumable, rejects with reasons);
a re-run redoes only what is missing or changed, and re-trains a classifier only when its
rows or settings changed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from cai_ray.classifiers import synth
from cai_ray.core import classify
from cai_ray.core.constitution import load_constitution
from cai_ray.core.types import Sampling

log = logging.getLogger(__name__)
KINDS = ("input", "output")


def _stage(cfg, store, name: str, rows: list[dict], fingerprint: dict, pool: str, engine, worker, kwargs: dict):
    """One of the job's engine stages (eval's, on Ray Data) into OUTPUT/work/NAME/: rows in,
    ({id: result}, {id: reason}) out, resumed per row; its counts in the manifest's timing."""
    from cai_ray.batch.stage import actor_engine_kwargs
    from cai_ray.config import to_dict
    from cai_ray.eval.stages import AnswerWorker, SubJob, read_results, run, write_inputs

    inp = write_inputs(store, f"work/{name}.jsonl", rows)
    folder = store.child(f"work/{name}")
    manifest = run(
        f"classifiers-{name}",
        SubJob(inp, folder.address(), cfg.inputs, cfg.outputs, cfg.ray_address, {"classifiers": to_dict(cfg)}),
        fingerprint,
        {},
        pool,
        getattr(cfg, pool),
        engine.backend,
        worker,
        dict(backend=engine.backend, engine_kwargs=actor_engine_kwargs(engine), seed=cfg.seed, **kwargs),
    )
    return manifest, read_results(folder, "answer" if worker is AnswerWorker else "result")


def _generate(cfg, store, name: str, rows: list[dict], sampling, timing: dict) -> tuple[dict, dict]:
    """The generator's stage NAME: ({id: text}, {id: reason})."""
    from cai_ray.config import to_dict
    from cai_ray.eval.stages import AnswerWorker
    from cai_ray.models import model_info

    g = cfg.generator
    fingerprint = {
        "generator": model_info(g.model, g.backend, g.base_url),
        "engine": to_dict(g),
        "sampling": to_dict(sampling),
        "seed": cfg.seed,
    }
    log.info("classifiers: the generator writes %d %s", len(rows), name)
    rows = [{"id": r["id"], "messages": r["messages"]} for r in rows]
    manifest, results = _stage(
        cfg, store, name, rows, fingerprint, "pool", g, AnswerWorker, {"sampling": Sampling.of(sampling)}
    )
    timing[name] = {**manifest["counts"], "wall_s": manifest["timing"]["wall_s"]}
    return results


def _judge(cfg, store, constitution, tasks: dict[str, dict], timing: dict) -> tuple[dict, dict]:
    """Every row judged once (OUTPUT/work/judgements/): ({task id: result}, {task id: reason})."""
    from cai_ray.config import to_dict
    from cai_ray.eval.stages import JudgeWorker
    from cai_ray.models import model_info

    j = cfg.judge
    fingerprint = {
        "judge": model_info(j.model, j.backend, j.base_url),
        "judge_engine": to_dict(j),
        "constitution": constitution.sha256,
    }
    log.info("classifiers: the judge labels %d rows", len(tasks))
    kwargs = {"constitution": constitution, "few_shot": 0}
    manifest, (done, rejected) = _stage(
        cfg, store, "judgements", list(tasks.values()), fingerprint, "judge_pool", j, JudgeWorker, kwargs
    )
    timing["judge"] = {**manifest["counts"], "wall_s": manifest["timing"]["wall_s"]}
    return {k: json.loads(v) for k, v in done.items() if k in tasks}, rejected


def _task_id(row: dict) -> str:
    from cai_ray.eval.stages import content_key

    return f"{row['kind']}:{content_key(row['prompt'], row['answer'], row['principle'])}"


def _train(cfg, out: Path, kind: str, rows: list[dict]) -> dict[str, Any]:
    """Train one classifier into OUTPUT/KIND/ (kept when its rows and settings are the same as
    the last finished run's): its manifest."""
    from cai_ray.config import to_dict
    from cai_ray.train.classifier import train_classifier
    from cai_ray.train.config import CheckpointSection, ClassifierTrainConfig
    from cai_ray.train.data import rows_sha256
    from cai_ray.train.harness import fingerprint_of

    train_rows = [{"id": r["id"], "text": r["text"], "target": r["target"]} for r in rows]
    data = out / "work" / f"{kind}_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    tcfg = ClassifierTrainConfig(
        data=str(data),
        output=str(out / kind),
        model=cfg.base,
        seed=cfg.seed,
        zero=cfg.zero,
        ray_address=cfg.ray_address,
        scaling=cfg.scaling,
        optim=cfg.optim,
        checkpoint=CheckpointSection(every_steps=10_000),  # small runs: the model at the end is enough
    )
    tcfg.validate()
    settings = to_dict(tcfg)
    fingerprint = fingerprint_of("classifier", settings, rows_sha256(train_rows), {})
    old = out / kind / "manifest.json"
    if old.exists():
        m = json.loads(old.read_text())
        # the resume fingerprint leaves the step budget out (a run may be extended); a finished
        # classifier is kept only when every setting but the cluster address is the same
        same = {k: v for k, v in settings.items() if k != "ray_address"} == {
            k: v for k, v in (m.get("config") or {}).items() if k != "ray_address"
        }
        if (
            m.get("status") == "finished"
            and m.get("fingerprint") == fingerprint
            and same
            and (out / kind / "model").is_dir()
        ):
            log.info("classifiers: the %s classifier is trained on these rows already (%s)", kind, out / kind)
            return m
        log.info("classifiers: the %s classifier's rows or settings changed: training it again", kind)
        shutil.rmtree(out / kind)
    log.info("classifiers: training the %s classifier on %d rows (%s)", kind, len(rows), cfg.base)
    return train_classifier(tcfg)


def train_classifiers(cfg) -> dict[str, Any]:
    """Run a ``ClassifiersConfig``; returns the manifest (metrics.json, guard.json beside it)."""
    from cai_ray import runtime

    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with runtime.output_lock(out):
        return _run(cfg, out)


def _run(cfg, out: Path) -> dict[str, Any]:
    from cai_ray import runtime
    from cai_ray.batch.records import reasons_count
    from cai_ray.batch.storage import Store
    from cai_ray.config import to_dict
    from cai_ray.eval.run import judge_principles, load_set

    t0 = time.perf_counter()
    store = Store(out)
    constitution = load_constitution(cfg.constitution)
    manifest = runtime.base_manifest("classifiers", to_dict(cfg))
    manifest["constitution"] = {"path": cfg.constitution, "name": constitution.name, "sha256": constitution.sha256}
    store.write_json("manifest.json", manifest)  # "running"
    timing: dict[str, Any] = {}
    rejects: list[dict] = []

    # 1 requests
    principles = synth.guarded(constitution, set(cfg.skip_category_list()))
    manifest["principles"] = [p.id for p in principles]
    tasks = synth.request_tasks(principles, cfg.per_principle, cfg.role_list())
    done, failed = _generate(cfg, store, "requests", tasks, cfg.prompt_sampling, timing)
    requests = []
    for t in tasks:
        text, why = synth.parse_request(done.get(t["id"]))
        if text is None:
            rejects.append({"id": t["id"], "stage": "requests", "reason": failed.get(t["id"]) or why})
        else:
            requests.append({**t, "request": text})

    # 2 answers: the synthetic ones, and the eval sets' (the output classifier's eval data)
    sets: dict[str, list[dict]] = {}
    for name, path in (("harmful", cfg.harmful), ("benign", cfg.benign)):
        if path:
            sets[name], bad = load_set(path, name, cfg.eval_limit, cfg.inputs.max_prompt_chars)
            rejects += [{**r, "stage": f"eval set {name}"} for r in bad]
    answer_rows = synth.answer_tasks(constitution, requests)
    answer_rows += [{"id": f"eval:{name}:{r['id']}", "messages": r["prompt"]} for name in sets for r in sets[name]]
    answers, failed = _generate(cfg, store, "answers", answer_rows, cfg.answer_sampling, timing)
    for r in answer_rows:
        if not answers.get(r["id"]):
            rejects.append({"id": r["id"], "stage": "answers", "reason": failed.get(r["id"]) or "empty answer"})

    # 3 the judge's label of every row
    rows = synth.synthetic_rows(requests, answers)
    if cfg.seed_examples:
        rows += synth.example_rows(constitution, {p.id for p in principles})
    eval_rows = []
    for name, items in sets.items():
        for r in items:
            aid = f"eval:{name}:{r['id']}"
            p = next(
                p for p in judge_principles(constitution, r, len(constitution.principles), cfg.seed) if p in principles
            )
            eval_rows.append({**synth.row(f"in:{aid}", "input", p.id, "eval", name, r["prompt"], None), "set": name})
            if answers.get(aid):
                eval_rows.append(
                    {**synth.row(f"out:{aid}", "output", p.id, "eval", name, r["prompt"], answers[aid]), "set": name}
                )
    judge_tasks = {}
    for r in rows + [r for r in eval_rows if r["kind"] == "output"]:
        r["task"] = _task_id(r)
        judge_tasks[r["task"]] = {
            "id": r["task"],
            "messages": r["prompt"],
            "task": synth.judge_task(r, constitution.principle(r["principle"])),
        }
    results, failed = _judge(cfg, store, constitution, judge_tasks, timing)

    # 4 targets and the split
    kept, filtered = [], []
    for r in rows:
        res = results.get(r["task"]) or {}
        r["judge_p"] = res.get("p")
        target, why = synth.decide(r["role"], r["judge_p"], cfg.targets, cfg.filter_margin)
        if target is None:
            filtered.append({**r, "filter_reason": failed.get(r["task"]) or res.get("invalid") or why})
            continue
        r["target"] = target
        r["split"] = "held_out" if synth.held_out(r["id"], cfg.held_out, cfg.seed) else "train"
        kept.append(r)
    for r in eval_rows:
        res = results.get(r.get("task")) or {}
        r["judge_p"] = res.get("p")
    store.write_jsonl("data/rows.jsonl", [_public(r) for r in kept])
    store.write_jsonl("filtered.jsonl", [_public(r) for r in filtered])
    store.write_jsonl("rejects.jsonl", rejects)

    # 5 train
    trained = {}
    for kind in KINDS:
        train = [r for r in kept if r["kind"] == kind and r["split"] == "train"]
        if kind == "output":
            train = _with_prefixes(train, cfg.prefixes, cfg.prefix_chars)
        classes = {r["target"] >= 0.5 for r in train}
        if len(classes) < 2:
            raise ValueError(
                f"the {kind} classifier's training rows have one class only ({len(train)} rows): "
                "raise per_principle, or filter_margin (the judge filtered the other class out)"
            )
        trained[kind] = _train(cfg, out, kind, train)

    # 6 measure: the threshold at `recall` on held-out rows, then the eval sets at that threshold
    from cai_ray.engine.classifier import TextClassifier

    metrics: dict[str, Any] = {"recall": cfg.recall}
    guard = {"constitution": {k: manifest["constitution"][k] for k in ("name", "sha256")}}
    for kind in KINDS:
        model_dir = out / kind / "model"
        held = [r for r in kept if r["kind"] == kind and r["split"] == "held_out"]
        # loaded once: held-out rows, then the eval sets; texts cut as in training
        clf = TextClassifier(str(model_dir), device="cpu", max_length=cfg.optim.max_length)
        scores = clf.scores([r["text"] for r in held])
        labels = [int(r["target"] >= 0.5) for r in held]
        m = {
            "held_out": classify.classifier_metrics(scores, labels, cfg.recall, n_boot=cfg.bootstrap, seed=cfg.seed),
            "by_principle": _by_principle(held, scores, labels),
        }
        threshold = m["held_out"]["threshold"]
        if threshold is None:
            raise ValueError(f"the {kind} classifier has no held-out violations to set its threshold on")
        ev = [r for r in eval_rows if r["kind"] == kind and (kind == "input" or r["judge_p"] is not None)]
        if ev:
            ev_scores = clf.scores([r["text"] for r in ev])
            # the input classifier's truth is the set (red-team prompts are attacks); the output
            # classifier's is the judge's (a red-team answer that refuses violates nothing)
            truth = [int(r["set"] == "harmful") if kind == "input" else int(r["judge_p"] >= 0.5) for r in ev]
            m["eval_sets"] = classify.classifier_metrics(
                ev_scores, truth, cfg.recall, threshold=threshold, n_boot=cfg.bootstrap, seed=cfg.seed
            )
            m["flag_rate"] = {
                name: classify.flag_rate(
                    [s for s, r in zip(ev_scores, ev) if r["set"] == name], threshold, cfg.bootstrap, cfg.seed
                )
                for name in sets
            }
            for r, s in zip(ev, ev_scores):
                r[f"{kind}_score"] = s
        for r, s in zip(held, scores):
            r["score"] = s
        metrics[kind] = m
        guard[kind] = {"model": f"{kind}/model", "threshold": threshold, "target_recall": cfg.recall}
    store.write_jsonl("data/held_out_scores.jsonl", [_public(r) for r in kept if r["split"] == "held_out"])
    store.write_jsonl("data/eval_rows.jsonl", [_public(r) for r in eval_rows])  # with their scores
    store.write_json("metrics.json", metrics)
    store.write_json("guard.json", guard)

    counts = {
        "requests_asked": len(tasks),
        "requests": len(requests),
        "rows": len(rows),
        "kept": len(kept),
        "filtered": len(filtered),
        "filtered_by_reason": reasons_count([{"reason": r["filter_reason"]} for r in filtered]),
        "rejected": len(rejects),
        "rejected_by_reason": reasons_count(rejects),
        "by_kind_split_role": _counts(kept),
        "eval_rows": len(eval_rows),
    }
    manifest.update(
        status="finished",
        finished=runtime.now(),
        counts=counts,
        metrics=metrics,
        trained={
            k: {"manifest": str(out / k / "manifest.json"), "wall_s": trained[k]["timing"]["wall_s"]} for k in KINDS
        },
        timing={**timing, "wall_s": round(time.perf_counter() - t0, 3)},
        guard=str(out / "guard.json"),
    )
    store.write_json("manifest.json", manifest)
    return manifest


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "task"}


def _with_prefixes(rows: list[dict], n: int, every: int) -> list[dict]:
    """Each output row and up to n-1 prefixes of its answer (same target: a violating answer
    is flagged as early as the classifier can tell, a respecting one never)."""
    out = []
    for r in rows:
        for i, prefix in enumerate(classify.prefixes(r["answer"], every, n)):
            text = classify.output_text(r["prompt"], prefix)
            out.append({**r, "id": r["id"] if prefix == r["answer"] else f"{r['id']}@{i}", "text": text})
    return out


def _by_principle(rows: list[dict], scores: list[float], labels: list[int]) -> dict[str, Any]:
    by: dict[str, tuple[list, list]] = {}
    for r, s, y in zip(rows, scores, labels):
        by.setdefault(r["principle"], ([], []))
        by[r["principle"]][0].append(s)
        by[r["principle"]][1].append(y)
    return {p: {"n": len(s), "auroc": classify.auroc(s, y)} for p, (s, y) in sorted(by.items())}


def _counts(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        key = f"{r['kind']}/{r['split']}/{r['role']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def headline(manifest: dict[str, Any]) -> list[str]:
    """The printed summary: per classifier, held-out and eval-set AUROC and FPR at the recall."""

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    def ci(c):
        return "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"

    m = manifest["metrics"]
    lines = [f"{'classifier':<11}{'data':<11}{'n':>6}  {'AUROC (95% CI)':<26}{'FPR at recall ' + str(m['recall']):<28}"]
    for kind in KINDS:
        for name in ("held_out", "eval_sets"):
            x = m[kind].get(name)
            if x:
                lines.append(
                    f"{kind:<11}{name:<11}{x['n']:>6}  {f(x['auroc']) + ci(x.get('auroc_ci')):<26}"
                    f"{f(x.get('fpr')) + ci(x.get('fpr_ci'))} (recall {f(x.get('recall'))})"
                )
    return lines
