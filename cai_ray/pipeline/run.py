"""The whole method as one resumable run: each stage's output is the next stage's input.

    prompts ─► generate ─► OUT/generate ─► sft ─► OUT/sft/model ─┬─► label (policy = SFT) ─► OUT/label
                                                                │        ├─► rm ─► OUT/rm/model ─► ppo ─► OUT/ppo/model
                                                                │        └─────────────────────── dpo ─► OUT/dpo/model
    eval: base (model) vs sl-cai (OUT/sft/model) vs rl-cai (OUT/ppo|dpo/model) ─► OUT/eval/report.html

Every stage has the name of its command (`cai-ray generate`, `train sft`, `label`, `train rm`,
`train ppo` or `train dpo`, `eval`), and so do its folder and its manifest's ``stage``; an
artifact is named after the stage that makes it (``generate_data``, ``sft_model``, ...).

A stage is the same job a user runs alone (`cai-ray generate`, `train sft`, ...), with its
config built from the pipeline file's section for it plus the wiring keys (inputs, outputs,
models) the pipeline sets; every stage config is validated before the first stage starts.

OUT/pipeline.json is the lineage: for every stage its config, fingerprint, inputs, outputs,
model, constitution hash, manifest and times, and for every artifact which stage made it
from which artifacts. A stage that finished with the same fingerprint is skipped on a re-run;
one that crashed is run again and resumes from its own checkpoints (data stages from their
ledgers, trainers from Ray Train checkpoints). A finished stage whose settings (or whose
inputs' settings) changed is refused with the keys that changed: ``--redo STAGE`` deletes it
and every later stage's output and runs them again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.config import ConfigError

log = logging.getLogger(__name__)


STAGES = ("generate", "sft", "label", "rm", "ppo", "dpo", "eval")  # a pipeline runs ppo or dpo (`rl`)
EVAL_NAMES = ("base", "sl-cai", "rl-cai")


@dataclass
class Stage:
    name: str
    cfg: Any  # the job's config object
    output: Path
    inputs: dict[str, str]  # artifact name → path
    produces: dict[str, str]  # artifact name → path
    run: Callable[[Any], dict]  # the job function


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def _build(name: str, cls, section: dict, defaults: dict, wired: dict):
    """The stage's config: its own defaults < pipeline defaults < the user's section; the
    wiring keys are the pipeline's (a user value for one is an error, not silently replaced)."""
    from cai_ray.config import check_job_paths, from_dict

    if not isinstance(section, dict):
        raise ConfigError(f"{name}: must be a mapping of `{name}` config keys")
    for key in wired:
        if _get(section, key) is not None:
            raise ConfigError(
                f"{name}.{key}: set by the pipeline (it wires each stage's output to the next); "
                f"remove it from the {name} section"
            )
    data = _merge(defaults, section)
    for key, value in wired.items():
        _set(data, key, value)
    try:
        cfg = from_dict(cls, data)
        cfg.validate()
        check_job_paths(cfg)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None
    return cfg


def stage_configs(pc) -> list[Stage]:
    """Every stage of a PipelineConfig, wired and validated (no model is loaded here)."""
    from cai_ray.eval.config import EvalConfig
    from cai_ray.generate.config import GenerateConfig
    from cai_ray.label.config import LabelConfig
    from cai_ray.train.config import DPOTrainConfig, RMTrainConfig, SFTTrainConfig
    from cai_ray.train.ppo.config import RLTrainConfig

    out = Path(pc.output).resolve()
    common = {"seed": pc.seed, "ray_address": pc.ray_address}
    sft_model = str(out / "sft" / "model")
    stages = []

    cfg = _build(
        "generate",
        GenerateConfig,
        pc.generate,
        {"engine": {"model": pc.model}},
        {"input": pc.prompts, "output": str(out / "generate"), "constitution": pc.constitution, **common},
    )
    stages.append(
        Stage(
            "generate",
            cfg,
            out / "generate",
            {"prompts": pc.prompts, "base_model": pc.model},
            {"generate_data": str(out / "generate")},
            _job("cai_ray.generate.run:generate"),
        )
    )

    cfg = _build(
        "sft",
        SFTTrainConfig,
        pc.sft,
        {"model": pc.model},
        {"data": str(out / "generate"), "output": str(out / "sft"), **common},
    )
    stages.append(
        Stage(
            "sft",
            cfg,
            out / "sft",
            {"generate_data": str(out / "generate"), "base_model": cfg.model},
            {"sft_model": sft_model},
            _job("cai_ray.train.sft:train_sft"),
        )
    )

    cfg = _build(
        "label",
        LabelConfig,
        pc.label,
        {"labeler": {"model": pc.model}},
        {
            "input": pc.prompts,
            "output": str(out / "label"),
            "constitution": pc.constitution,
            "policy.model": sft_model,
            **common,
        },
    )
    labeler = cfg.labeler.model
    stages.append(
        Stage(
            "label",
            cfg,
            out / "label",
            {"prompts": pc.prompts, "sft_model": sft_model, "labeler_model": labeler},
            {"label_data": str(out / "label")},
            _job("cai_ray.label.run:label"),
        )
    )

    rl_out = out / pc.rl  # the RL-CAI stage: ppo/ or dpo/
    rl_model = str(rl_out / "model")
    if pc.rl == "ppo":
        cfg = _build(
            "rm",
            RMTrainConfig,
            pc.rm,
            {"model": sft_model},
            {"data": str(out / "label"), "output": str(out / "rm"), **common},
        )
        stages.append(
            Stage(
                "rm",
                cfg,
                out / "rm",
                {"label_data": str(out / "label"), "init_model": cfg.model},
                {"rm_model": str(out / "rm" / "model")},
                _job("cai_ray.train.rm:train_rm"),
            )
        )
        cfg = _build(
            "ppo",
            RLTrainConfig,
            pc.ppo,
            {},
            {
                "data": pc.rl_prompts or pc.prompts,
                "output": str(rl_out),
                "model": sft_model,
                "reward.model": str(out / "rm" / "model"),
                **common,
            },
        )
        stages.append(
            Stage(
                "ppo",
                cfg,
                rl_out,
                {
                    "rl_prompts": pc.rl_prompts or pc.prompts,
                    "sft_model": sft_model,
                    "rm_model": str(out / "rm" / "model"),
                },
                {"ppo_model": rl_model},
                _job("cai_ray.train.ppo.loop:train_rl"),
            )
        )
    else:
        cfg = _build(
            "dpo",
            DPOTrainConfig,
            pc.dpo,
            {},
            {"data": str(out / "label"), "output": str(rl_out), "model": sft_model, **common},
        )
        stages.append(
            Stage(
                "dpo",
                cfg,
                rl_out,
                {"label_data": str(out / "label"), "sft_model": sft_model},
                {"dpo_model": rl_model},
                _job("cai_ray.train.dpo:train_dpo"),
            )
        )

    models = [f"base={pc.model}", f"sl-cai={sft_model}", f"rl-cai={rl_model}"]
    cfg = _build(
        "eval",
        EvalConfig,
        pc.eval,
        {"judge": {"model": labeler}},
        {"models": models, "baseline": "base", "output": str(out / "eval"), "constitution": pc.constitution, **common},
    )
    stages.append(
        Stage(
            "eval",
            cfg,
            out / "eval",
            {
                "base_model": pc.model,
                "sft_model": sft_model,
                f"{pc.rl}_model": rl_model,
                "harmful": cfg.harmful,
                "benign": cfg.benign,
                "judge_model": cfg.judge.model,
            },
            {"eval_report": str(out / "eval" / "report.html"), "eval_metrics": str(out / "eval" / "metrics.json")},
            _job("cai_ray.eval.run:evaluate"),
        )
    )
    return stages


def _job(target: str) -> Callable[[Any], dict]:
    def run(cfg):
        import importlib

        module, fn = target.split(":")
        return getattr(importlib.import_module(module), fn)(cfg)

    run.target = target
    return run


# -- lineage --------------------------------------------------------------------------------
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: str) -> str | None:
    """A file's SHA-256; a folder's (a model, an output, a folder of prompt files)
    runtime.folder_fingerprint; an object-store input's listing (names, sizes, times)."""
    from cai_ray.runtime import file_sha256, folder_fingerprint

    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        return "files:" + folder_fingerprint(p)
    if "://" in path:
        return _remote_listing_sha(path)
    return None


def _remote_listing_sha(uri: str) -> str | None:
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        if not infos:
            infos = [fs.get_file_info(root)]
    except Exception as e:  # an unreachable store: the stage reruns rather than trusting a stale hash
        log.warning("cannot list %s for its fingerprint (%s); treating it as changed", uri, e)
        return f"unlisted:{time.time()}"
    entries = sorted(f"{i.path}\0{i.size}\0{i.mtime_ns}" for i in infos if i.type == pafs.FileType.File)
    return "listing:" + hashlib.sha256("\n".join(entries).encode()).hexdigest()


def stage_fingerprint(stage: Stage, upstream: dict[str, str], sha=_file_sha) -> dict[str, Any]:
    """What a finished stage must match to be skipped: its config (where it runs aside), the
    contents of its input files, and the fingerprints of the stages that made its inputs."""
    from cai_ray.config import to_dict

    config = to_dict(stage.cfg)
    config.pop("ray_address", None)
    files = {k: h for k, v in stage.inputs.items() if (h := sha(v))}
    return {"config_sha256": _sha(config), "input_files": files, "upstream": upstream, "config": config}


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed(a, b, f"{prefix}{k}.")
        elif a != b and k != "config_sha256":
            keys.append(prefix + k)
    return keys


def _finished(stage: Stage) -> bool:
    m = stage.output / "manifest.json"
    if not m.exists():
        return False
    return json.loads(m.read_text()).get("status", "finished") == "finished" and all(
        Path(p).exists() for p in stage.produces.values()
    )


# -- the run --------------------------------------------------------------------------------
def run_pipeline(pc, redo: str | None = None, until: str | None = None, say=None) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns pipeline.json's content. ``say`` prints the
    stage lines (default: stdout; the demo sends them to the terminal while logs go to a file)."""
    say = say or (lambda line: print(line, flush=True))
    from cai_ray import runtime
    from cai_ray.config import to_dict
    from cai_ray.core.constitution import load_constitution

    stages = stage_configs(pc)
    names = [s.name for s in stages]
    if "rl" in (redo, until):  # the RL-CAI stage's name before stages had their commands' names
        log.warning(
            "pipeline: stage 'rl' is now %r (its command, `train %s`); the old name will be removed", pc.rl, pc.rl
        )
        redo, until = (pc.rl if v == "rl" else v for v in (redo, until))
    for opt, value in (("--redo", redo), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(
                f"{opt}: unknown stage {value!r}; this pipeline's stages (rl={pc.rl}): {', '.join(names)}"
            )
    out = Path(pc.output).resolve()
    old = {"sl_data": "generate/", "labels": "label/", "rl": "ppo/ or dpo/"}
    old = [f"{name}/ is now {new}" for name, new in old.items() if (out / name).is_dir()]
    if old:  # the folder names before every stage had its command's name
        raise ConfigError(
            f"{out} holds a run of an earlier cai-ray ({'; '.join(old)}: each stage's folder has its command's "
            "name); use a new --output, or delete this one"
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    constitution = load_constitution(pc.constitution)
    state.update(
        pipeline=to_dict(pc),
        status="running",
        updated=runtime.now(),
        versions=runtime.versions(),
        constitution={"name": constitution.name, "path": constitution.path, "sha256": constitution.sha256},
    )
    state.setdefault("started", runtime.now())
    state.setdefault("stages", {})
    if redo is not None:
        for s in stages[names.index(redo) :]:
            if s.output.exists():
                log.warning("pipeline: --redo %s: deleting %s", redo, s.output)
                shutil.rmtree(s.output)
            state["stages"].pop(s.name, None)
    last = names.index(until) if until else len(stages) - 1
    upstream_fp: dict[str, str] = {}
    hashes: dict[str, str | None] = {}

    def sha(path: str) -> str | None:  # each input file read once per run (a prompt file may be large)
        if path not in hashes:
            hashes[path] = _file_sha(path)
        return hashes[path]

    artifacts = {
        "prompts": {"path": pc.prompts, "sha256": sha(pc.prompts), "produced_by": None},
        "base_model": {"path": pc.model, "produced_by": None},
    }
    for i, stage in enumerate(stages[: last + 1]):
        fp = stage_fingerprint(stage, {k: upstream_fp[k] for k in _upstream(stage, stages) if k in upstream_fp}, sha)
        rec = state["stages"].get(stage.name) or {}
        for k, v in stage.inputs.items():
            artifacts.setdefault(k, {"path": v, "sha256": sha(v), "produced_by": None})
        changed = _changed(rec["fingerprint"], fp) if rec.get("fingerprint") else []
        if changed:
            raise ConfigError(
                f"stage {stage.name} in {stage.output} ran with other settings or inputs (changed: "
                f"{', '.join(changed[:8])}); re-run with --redo {stage.name} to delete it and every later "
                f"stage and run them again, or use a new --output"
            )
        if rec.get("status") == "finished" and _finished(stage):
            log.info(
                "pipeline: stage %d/%d %s: finished earlier, skipped (%s)", i + 1, len(stages), stage.name, stage.output
            )
            say(f"[pipeline] {i + 1}/{len(stages)} {stage.name}: done earlier, skipped")
        else:
            say(f"[pipeline] {i + 1}/{len(stages)} {stage.name}: {_describe(stage)}")
            rec = {
                "status": "running",
                "fingerprint": fp,
                "started": runtime.now(),
                "runs": rec.get("runs", 0) + 1,
                "job": stage.run.target,
            }
            state["stages"][stage.name] = rec
            runtime.write_json_atomic(path, state)
            t0 = time.perf_counter()
            try:
                manifest = stage.run(stage.cfg)
            except BaseException as e:
                rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000], failed=runtime.now())
                state["status"] = "failed"
                runtime.write_json_atomic(path, state)
                raise
            rec.update(
                status="finished",
                finished=runtime.now(),
                seconds=round(time.perf_counter() - t0, 1),
                manifest=str(stage.output / "manifest.json"),
                summary=_summary(stage.name, manifest),
            )
            if pc.prune_checkpoints:
                rec.update(_prune_checkpoints(stage))
        rec.update(
            output=str(stage.output),
            inputs=stage.inputs,
            produces=stage.produces,
            config=to_dict(stage.cfg),
            constitution_sha256=constitution.sha256 if stage.name in ("generate", "label", "eval") else None,
            model=_stage_model(stage.cfg),
        )
        state["stages"][stage.name] = rec
        upstream_fp[stage.name] = _sha(fp)
        for art, p in stage.produces.items():
            artifacts[art] = {
                "path": p,
                "produced_by": stage.name,
                "from": sorted(stage.inputs),
                "stage_fingerprint": upstream_fp[stage.name],
            }
        state["artifacts"] = artifacts
        runtime.write_json_atomic(path, state)
    state["status"] = "finished" if last == len(stages) - 1 else f"stopped after {stages[last].name}"
    state["finished"] = runtime.now()
    runtime.write_json_atomic(path, state)
    return state


def _prune_checkpoints(stage: Stage) -> dict[str, Any]:
    """``prune_checkpoints``: a finished training stage's Ray Train checkpoints go (its model,
    metrics and manifest stay); the manifest says so. Checkpoints kept elsewhere
    (``checkpoint.storage``) are the user's and stay."""
    ckpt = getattr(stage.cfg, "checkpoint", None)
    folder = stage.output / "ray"
    if ckpt is None or ckpt.storage or not folder.is_dir():
        return {}
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    shutil.rmtree(folder)
    note = f"pruned by the pipeline (prune_checkpoints): {folder}, {size / 2**30:.2f} GiB"
    log.info("pipeline: stage %s: %s", stage.name, note)
    m = stage.output / "manifest.json"
    from cai_ray import runtime

    runtime.write_json_atomic(m, {**json.loads(m.read_text()), "checkpoint": None, "checkpoints": note})
    return {"checkpoints": note}


def _upstream(stage: Stage, stages: list[Stage]) -> list[str]:
    """The earlier stages that produce this stage's inputs."""
    made_by = {art: s.name for s in stages for art in s.produces}
    return sorted({made_by[a] for a in stage.inputs if a in made_by})


def _stage_model(c) -> str | None:
    """The model that made a stage's output (the labeler for labels, the judge for eval)."""
    if getattr(getattr(c, "engine", None), "model", ""):
        return c.engine.model
    for section in ("labeler", "judge"):
        if hasattr(c, section):
            return getattr(c, section).model
    return getattr(c, "model", None)


def stage_lines(state: dict[str, Any]) -> list[str]:
    """One line per stage of a pipeline.json: status, seconds of its last run, output."""
    return [
        f"  {name:<9} {rec['status']:<9} {rec.get('seconds', '-')!s:>7} s  {rec['output']}"
        for name, rec in state["stages"].items()
    ]


def _describe(stage: Stage) -> str:
    ins = ", ".join(f"{k}={v}" for k, v in stage.inputs.items())
    return f"{ins} -> {stage.output}"


def _summary(name: str, m: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a stage's manifest worth seeing in the lineage file."""
    if name in ("generate", "label"):
        return {"counts": m.get("counts")}
    if name == "eval":
        return {
            "models": {
                k: {
                    "attack_success_rate": v["harmlessness"]["attack_success_rate"],
                    "benign_refusal_rate": v["over_refusal"]["judge_refusal_rate"],
                    "win_rate_vs_baseline": v["helpfulness"]["win_rate_vs_baseline"],
                }
                for k, v in m["metrics"]["models"].items()
            }
        }
    metrics = m.get("metrics") or {}
    return {k: metrics.get(k) for k in ("global_step", "train_loss") if k in metrics}
