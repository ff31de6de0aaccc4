"""The harness every trainer runs in: Ray Train workers, DeepSpeed ZeRO, checkpoints, outputs.

    driver: rows ─► manifest (fingerprint, data lineage) ─► TorchTrainer(N workers) ─► loss.png, manifest
    worker: restore Ray Train checkpoint ─► build(job) → TRL trainer ─► train ─► save OUTPUT/model
            (LoRA merged) ─► rank 0: metrics.json (+ the trainer's own after_save metrics)

A trainer module (sft, rm, dpo) supplies ``load_base(job)`` (tokenizer and model),
``build(job, work, callbacks)`` returning a TRL trainer, and may supply ``after_save(job, model_dir, out)`` for metrics computed on the saved
model (the preference model's held-out accuracy). ``c`` holds plain values only: it travels
to the workers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerJob:
    """What every Ray Train worker receives: the job's own config object (frozen, with its
    typed sections) and the facts the driver settled for this run. No hand-built dicts."""

    kind: str  # sft | rm | dpo | ppo | grpo | rloo | classifier
    cfg: Any  # the trainer's config: SFTTrainConfig, RMTrainConfig, DPOTrainConfig, RLTrainConfig
    rows: tuple[dict[str, Any], ...]  # the training rows (validated by the driver)
    output: str  # the driver's output folder (its staging folder when the output is an object store): see folder()
    use_gpu: bool
    store: str | None = None  # the object-store output rank 0 publishes to
    extra: Any = None  # the trainer's own frozen facts (the preference model's held-out pairs)
    base_dir: str = ""  # the driver's working dir: relative files the config names, for workers running elsewhere
    rank: int = 0

    def folder(self) -> Path:
        """Where this worker writes. With an object-store output, the staging folder of the
        node it runs on, under that node's own temp dir: the driver's path need not exist or
        be writable there (a worker node's TMPDIR is often a scratch volume of its own)."""
        return staging_folder(self.cfg.output) if self.store else Path(self.output)


TITLES = {
    "sft": "SFT loss",
    "rm": "preference model loss",
    "dpo": "DPO loss",
    "ppo": "PPO policy loss",
    "grpo": "GRPO loss",
    "rloo": "RLOO loss",
    "classifier": "classifier loss (binary cross-entropy)",
}
# trainer → the module with its load_base/build (default cai_ray.train.<kind>)
MODULES = {"grpo": "cai_ray.train.ppo.critic_free", "rloo": "cai_ray.train.ppo.critic_free"}


# -- on every worker ------------------------------------------------------------------------
def precision(job: WorkerJob) -> tuple[bool, bool]:
    """(use CUDA, bf16) for this worker."""
    import torch

    cuda = torch.cuda.is_available() and bool(job.use_gpu)
    return cuda, job.cfg.optim.dtype == "bfloat16" or (job.cfg.optim.dtype == "auto" and cuda)


def training_args(args_cls, job: WorkerJob, work: Path, **extra):
    """The TRL config (SFTConfig, RewardConfig, DPOConfig: all TrainingArguments) shared by
    every trainer: steps, batch, optimiser, precision, ZeRO, checkpoint cadence."""
    from cai_ray.train.zero import zero_config

    cuda, bf16 = precision(job)
    if "max_length" in args_cls.__dataclass_fields__:  # GRPO/RLOO bound the completion instead
        extra.setdefault("max_length", job.cfg.optim.max_length)
    settings = dict(
        output_dir=str(work / "hf"),
        num_train_epochs=job.cfg.optim.epochs,
        max_steps=job.cfg.optim.max_steps,
        learning_rate=job.cfg.optim.learning_rate,
        per_device_train_batch_size=job.cfg.optim.per_worker_batch_size,
        gradient_accumulation_steps=job.cfg.optim.grad_accum,
        warmup_steps=job.cfg.optim.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        bf16=bf16,
        use_cpu=not cuda,
        deepspeed=zero_config(job.cfg.zero, job.cfg.offload),
        logging_steps=1,
        save_strategy="steps",
        save_steps=job.cfg.checkpoint.every_steps,
        save_total_limit=job.cfg.checkpoint.keep,
        report_to=[],
        seed=job.cfg.seed,
        data_seed=job.cfg.seed,
        disable_tqdm=job.rank != 0,
    )
    return args_cls(**{**settings, **extra})  # a trainer's own keys win (GRPO: max_steps = ppo.steps)


def load_causal_lm(job: WorkerJob):
    """``load_base`` of the trainers whose model is a causal LM (sft, dpo, grpo/rloo)."""
    from transformers import AutoModelForCausalLM

    return load_model(job, AutoModelForCausalLM)


def load_model(job: WorkerJob, auto_cls, **kwargs):
    """(tokenizer, model) for the base model in the worker's precision; a pad token is set."""
    import torch
    from transformers import AutoTokenizer

    from cai_ray.models import resolve_model

    path = resolve_model(job.cfg.model)
    _, bf16 = precision(job)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = auto_cls.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32, **kwargs)
    return tok, model


@contextlib.contextmanager
def single_process_loading():
    """Load a model in this process alone. After a ZeRO-3 trainer exists, transformers'
    ``from_pretrained`` partitions new models across all ranks (``zero.Init``), which blocks
    when only rank 0 loads (merging LoRA, scoring held-out pairs)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def lora_config(job: WorkerJob, task_type: str):
    """peft LoraConfig from the ``lora`` section, or None when LoRA is off."""
    settings = lora_dict(job)
    if settings is None:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, **settings)


def lora_dict(job: WorkerJob) -> dict | None:
    """The ``lora`` section as plain settings for a process that builds its own adapter (a
    rollout engine): rank, alpha, dropout, target modules."""
    lora = job.cfg.lora
    if not lora.enabled:
        return None
    targets = lora.target_modules
    return {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
    }


def train_loop(config: dict[str, WorkerJob]) -> None:
    """Ray Train worker function: restore the run's latest checkpoint (after a restart or a
    re-run), train, save the model, report."""
    job = config["job"]
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    module = importlib.import_module(MODULES.get(job.kind, f"cai_ray.train.{job.kind}"))
    rank = ray.train.get_context().get_world_rank()
    out = job.folder()
    work = out / "_work" / f"rank{rank}"
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        # the Trainer resumes from a local folder: copy the reported checkpoint there
        with ckpt.as_directory() as d:
            local = work / "resume"
            shutil.rmtree(local, ignore_errors=True)
            shutil.copytree(Path(d) / RayTrainReportCallback.CHECKPOINT_NAME, local)
            resume = str(local)
    job = replace(job, rank=rank)
    trainer = module.build(job, work, [RayTrainReportCallback()])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    model_dir = save_model(trainer, job, out, module)
    if rank == 0:
        history = [h for h in trainer.state.log_history if "loss" in h]
        metrics = {
            "train_loss": result.training_loss,
            "global_step": trainer.state.global_step,
            "resumed_from": resume is not None,
            "train_seconds": round(seconds, 3),
            "samples_per_second": result.metrics.get("train_samples_per_second"),
            "last_log": history[-1] if history else None,
            "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history],
            "history": trainer.state.log_history,  # everything the trainer logged (GRPO: rewards at generation steps)
        }
        if hasattr(module, "after_save"):
            with single_process_loading():
                metrics.update(module.after_save(job, model_dir, out))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        publish(job, out)
    drop_scratch(out, rank)
    ray.train.report({"global_step": trainer.state.global_step, "train_loss": result.training_loss})


def drop_scratch(out: Path, rank: int) -> None:
    """Each rank removes its own scratch (``_work/rankN``: HF checkpoints, the resume copy)
    when training ends. The driver's cleanup only reaches its own node: on a cluster with an
    object-store output, the other nodes' ranks would leave their checkpoints on local disk."""
    work = out / "_work"
    shutil.rmtree(work / f"rank{rank}", ignore_errors=True)
    if rank == 0:
        shutil.rmtree(work / "adapter", ignore_errors=True)
    with contextlib.suppress(OSError):
        work.rmdir()  # the last rank out removes the folder (fails while others still use it)


# what the driver writes itself (and the scratch that never leaves a worker)
DRIVER_FILES = ("manifest.json", "rejects.jsonl", "loss.png", ".lock")
SCRATCH = ("_work", "ray")


def publish(job: WorkerJob, out: Path) -> None:
    """Rank 0, when training ends: a run whose output is an object store uploads what it wrote
    (model/, metrics.json, ...) from this worker's disk, which need not be the driver's. A
    folder output is already in place (a shared mount on a cluster)."""
    if job.store:
        from cai_ray.batch.storage import Store

        Store(job.store).upload_folder(out, skip=DRIVER_FILES, skip_dirs=SCRATCH)
        # the store holds them now: rank 0's node keeps no model copy per run on local disk
        for p in out.iterdir():
            if p.name not in DRIVER_FILES and p.name not in SCRATCH:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def staging_folder(uri: str) -> Path:
    """Where a run with an object-store output works on this machine: the same folder for the
    same URI, so a re-run here finds its rank's scratch; the checkpoints that make a run
    resumable are in the object store (OUTPUT/ray)."""
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / "cai-ray-staging" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def save_model(trainer, job: WorkerJob, out: Path, module) -> Path:
    """OUTPUT/model as a plain HF model folder. Every rank takes part (ZeRO-3 gathers the
    weights); rank 0 writes. LoRA adapters are merged into the base weights unless
    ``lora.merge`` is false, in which case OUTPUT/model is the adapter."""
    model_dir = out / "model"
    lora = job.cfg.lora
    if not lora.enabled or not lora.merge:
        trainer.save_model(str(model_dir))
        if job.rank == 0:
            trainer.processing_class.save_pretrained(str(model_dir))
        return model_dir
    adapter = out / "_work" / "adapter"
    trainer.save_model(str(adapter))
    if job.rank == 0:
        from peft import PeftModel

        with single_process_loading():
            _, base = module.load_base(replace(job, use_gpu=False))
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(model_dir))
        trainer.processing_class.save_pretrained(str(model_dir))
    return model_dir


# -- the job --------------------------------------------------------------------------------
def run(
    kind: str,
    cfg,
    rows: list[dict],
    rejects: list[dict],
    *,
    loop=None,
    stage: str | None = None,
    extra: Any = None,
    fingerprint_extra: dict | None = None,
    manifest_extra: dict | None = None,
) -> dict[str, Any]:
    """Train ``rows`` with trainer ``kind`` on Ray Train as ``cfg`` (a TrainConfig) says;
    returns the manifest (also at OUTPUT/manifest.json). ``loop`` is the worker function
    (default ``train_loop``, the TRL trainers'; PPO brings its own); ``stage`` the manifest's
    (default ``kind``); ``extra`` the trainer's own frozen facts for its workers."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cai_ray import runtime
    from cai_ray.batch.records import reasons_count
    from cai_ray.batch.storage import Store, is_uri
    from cai_ray.config import to_dict
    from cai_ray.models import model_info
    from cai_ray.train.data import rows_sha256

    store = Store(cfg.output) if is_uri(cfg.output) else None  # an object store: work here, upload
    out = staging_folder(cfg.output) if store else Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if store:
        (out / "metrics.json").unlink(missing_ok=True)  # this run's rank 0 writes it again
    where = store or Store(out)  # what the manifest names and where it is written
    config = to_dict(cfg)
    fingerprint = fingerprint_of(kind, config, rows_sha256(rows), fingerprint_extra or {})
    refuse_mixed_run(where, fingerprint)
    where.write_jsonl("rejects.jsonl", rejects)
    manifest = runtime.base_manifest(stage or kind, config)
    manifest["fingerprint"] = fingerprint
    manifest.update(
        data={
            "path": cfg.data,
            "rows": len(rows),
            "rejected": len(rejects),
            "rejected_by_reason": reasons_count(rejects),
            "rejects": where.address("rejects.jsonl"),
            "manifest": data_manifest(cfg.data),
        },
        base_model=model_info(cfg.model),
        **(manifest_extra or {}),
    )
    storage, run_name = checkpoint_home(kind, cfg.checkpoint.storage, where)
    claim_checkpoints(storage, run_name, where.address(), fingerprint)
    manifest["checkpoints"] = f"{storage.rstrip('/')}/{run_name}"
    where.write_json("manifest.json", manifest)  # "running"

    runtime.init_ray(cfg.ray_address)
    use_gpu = cfg.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    trainer = TorchTrainer(
        loop or train_loop,
        # Ray Train's contract is a dict; ours is one typed item in it
        train_loop_config={
            "job": WorkerJob(kind, cfg, tuple(rows), str(out), use_gpu, store and store.uri, extra, os.getcwd())
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    shutil.rmtree(out / "_work", ignore_errors=True)  # per-rank HF checkpoints: Ray Train keeps its own
    # rank 0 wrote it here, or (another node, object-store output) uploaded it
    metrics = (
        json.loads((out / "metrics.json").read_text())
        if (out / "metrics.json").exists()
        else where.read_json("metrics.json")
    )
    plot_loss(metrics["loss_curve"], out / "loss.png", TITLES[kind])
    manifest.update(
        status="finished",
        finished=runtime.now(),
        metrics={k: v for k, v in metrics.items() if k not in ("loss_curve", "history")},
        timing={"wall_s": round(wall, 3)},
        model_dir=where.address("model"),
        checkpoint=str(result.checkpoint.path) if result.checkpoint else None,
    )
    if store:
        store.write_bytes("loss.png", (out / "loss.png").read_bytes())
        (out / "loss.png").unlink()
    where.write_json("manifest.json", manifest)  # last: "finished" means everything is there
    return manifest


def data_manifest(path: str) -> dict | None:
    """The manifest of the stage that wrote the data (SL-CAI, labeling): the lineage."""
    p = Path(path) / "manifest.json"
    return json.loads(p.read_text()) if Path(path).is_dir() and p.exists() else None


def fingerprint_of(kind: str, config: dict[str, Any], data_sha256: str, extra: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoints. The step
    budget (epochs, max_steps) may change: that is how a run is extended."""
    o = config["optim"]
    return {
        "kind": kind,
        "model": config["model"],
        "data_sha256": data_sha256,
        "seed": config["seed"],
        "zero": config["zero"],
        "workers": config["scaling"]["workers"],  # ZeRO checkpoints are partitioned per rank
        "lora": config["lora"],
        **{k: o[k] for k in ("learning_rate", "per_worker_batch_size", "grad_accum", "max_length", "dtype")},
        **extra,
    }


OWNER = "cai_ray_run.json"  # in a run's checkpoint folder: which output the checkpoints belong to


def checkpoint_home(kind: str, storage: str | None, where) -> tuple[str, str]:
    """(Ray Train storage path, run name). Ray Train resumes whatever run of that name it
    finds in that storage, so the name must belong to this output: in the output's own
    ``ray/`` folder the trainer's kind is enough; in a shared ``checkpoint.storage`` (every
    GPU config sets one) the name carries a hash of the output, or a second run with another
    output would resume the first one and, had it finished, hand back its model."""
    import hashlib

    if not storage:
        return where.address("ray"), kind
    return storage, f"{kind}-{hashlib.sha256(where.address().encode()).hexdigest()[:12]}"


def claim_checkpoints(storage: str, name: str, output: str, fingerprint: dict[str, Any]) -> None:
    """Refuse checkpoints that another run wrote (their owner file names another output),
    else record this run as their owner before any worker looks for a checkpoint."""
    from cai_ray.batch.storage import Store

    home = Store(storage).child(name)
    if home.exists(OWNER):
        owner = home.read_json(OWNER)
        if owner.get("output") != output:
            raise ValueError(
                f"checkpoints in {home.address()} belong to another run (output {owner.get('output')}); "
                f"this run (output {output}) would resume them. Use another checkpoint.storage, or delete them."
            )
        theirs = owner.get("fingerprint") or {}
        changed = sorted(k for k in {*theirs, *fingerprint} if theirs.get(k) != fingerprint.get(k))
        if changed:
            raise ValueError(
                f"checkpoints in {home.address()} were written with other settings ({', '.join(changed)}); "
                "re-running would resume them. Use a new --output, or delete them."
            )
    home.write_json(OWNER, {"output": output, "fingerprint": fingerprint})


def refuse_mixed_run(out, fingerprint: dict[str, Any]) -> None:
    """Ray Train resumes any run of the same name and storage; refuse it when the settings
    that shaped the checkpoints changed, instead of silently continuing another run."""
    from cai_ray.batch.storage import as_store, changed_settings

    out = as_store(out)
    changed = changed_settings(out, fingerprint)
    if changed:
        raise ValueError(
            f"{out} holds a training run with different settings ({', '.join(changed)}); "
            "re-running would resume it. Use a new --output, or delete the old one."
        )


def plot_loss(curve: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], "-o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
