"""SFT on the SL-CAI revisions: Ray Train workers running TRL's SFTTrainer under DeepSpeed.

    SL output (messages) ─► prompt/completion rows ─► TorchTrainer(N workers) ─► OUTPUT/model/
                                                      SFTTrainer + ZeRO stage      metrics.json, loss.png
                                                      checkpoints → storage         manifest.json

Rows are conversational prompt/completion pairs (the completion is the final assistant
turn), so only the answer is trained (TRL's completion-only loss). Checkpoints go to the
Ray Train storage path through ``RayTrainReportCallback``; a worker restarted by Ray Train
(``checkpoint.max_failures``) resumes from the latest one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TrainDataError(ValueError):
    pass


def sft_rows(path: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(prompt/completion rows, rejected rows by reason) from an SL-CAI output folder or a
    JSONL/Parquet file. A row needs ``messages`` ending with an assistant turn (or
    ``prompt`` + ``completion`` strings)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if p.is_dir():
        files = sorted((p / "data").glob("part-*.parquet")) or sorted(p.glob("*.parquet"))
        if not files:
            raise TrainDataError(f"{path}: no data/part-*.parquet or *.parquet files")
        records = [r for f in files for r in pq.read_table(f).to_pylist()]
    elif p.suffix == ".parquet":
        records = pq.read_table(p).to_pylist()
    elif p.suffix in (".jsonl", ".json"):
        records = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    records.append({"_invalid": f"line {i}: invalid JSON: {e.msg}"})
    else:
        raise TrainDataError(f"{path}: not found, or not a folder / .jsonl / .parquet file")
    rows, rejected = [], {}
    for r in records:
        row, why = _sft_row(r)
        if row is None:
            rejected[why] = rejected.get(why, 0) + 1
        else:
            rows.append(row)
    if not rows:
        raise TrainDataError(f"{path}: no usable rows ({rejected or 'empty'})")
    return rows, rejected


def _sft_row(r: dict) -> tuple[dict | None, str | None]:
    if "_invalid" in r:
        return None, "invalid JSON"
    if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str) and "messages" not in r:
        if not r["completion"].strip():
            return None, "empty completion"
        return {"prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}]}, None
    msgs = r.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2:
        return None, "needs 'messages' (>= 2 turns) or 'prompt' + 'completion'"
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant") for m in msgs):
        return None, "malformed messages"
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        return None, "the last message must be a non-empty assistant turn"
    clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
    return {"prompt": clean[:-1], "completion": clean[-1:]}, None


# -- on every worker --------------------------------------------------------------------------
def make_trainer(c: dict[str, Any], work: Path, callbacks: list | None = None):
    """TRL SFTTrainer for one worker, from plain values (``c``): model, data, DeepSpeed ZeRO
    config, precision. Used by the Ray Train worker below and by the GPU check."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from cai_ray.models import resolve_model
    from cai_ray.train.deepspeed import zero_config

    path = resolve_model(c["model"])
    cuda = torch.cuda.is_available() and c["use_gpu"]
    bf16 = c["dtype"] == "bfloat16" or (c["dtype"] == "auto" and cuda)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    args = SFTConfig(
        output_dir=str(work / "hf"),
        num_train_epochs=c["epochs"],
        max_steps=c["max_steps"],
        learning_rate=c["learning_rate"],
        per_device_train_batch_size=c["per_worker_batch_size"],
        gradient_accumulation_steps=c["grad_accum"],
        warmup_steps=c["warmup_ratio"],  # a float in [0, 1) is a ratio of the total steps
        max_length=c["max_length"],
        bf16=bf16,
        use_cpu=not cuda,
        deepspeed=zero_config(c["zero"], c["offload"]),
        logging_steps=1,
        save_strategy="steps",
        save_steps=c["every_steps"],
        save_total_limit=c["keep"],
        report_to=[],
        seed=c["seed"],
        data_seed=c["seed"],
        completion_only_loss=True,
        disable_tqdm=c.get("rank", 0) != 0,
    )
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(c["rows"]),
                      processing_class=tok, callbacks=callbacks or [])


def train_loop(c: dict[str, Any]) -> None:
    """Ray Train worker function: the SFTTrainer over ``c["rows"]``, resuming from the run's
    latest reported checkpoint, reporting new ones (c is plain values)."""
    import shutil

    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    rank = ray.train.get_context().get_world_rank()
    work = Path(c["output"]) / "_work" / f"rank{rank}"
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        # the Trainer resumes from a local folder: copy the reported checkpoint there
        with ckpt.as_directory() as d:
            local = work / "resume"
            shutil.rmtree(local, ignore_errors=True)
            shutil.copytree(Path(d) / RayTrainReportCallback.CHECKPOINT_NAME, local)
            resume = str(local)
    trainer = make_trainer({**c, "rank": rank}, work, [RayTrainReportCallback()])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    model_dir = Path(c["output"]) / "model"
    trainer.save_model(str(model_dir))  # every rank takes part (ZeRO-3 gathers); rank 0 writes
    if rank == 0:
        trainer.processing_class.save_pretrained(str(model_dir))
        history = [h for h in trainer.state.log_history if "loss" in h]
        metrics = {
            "train_loss": result.training_loss,
            "global_step": trainer.state.global_step,
            "resumed_from": resume is not None,
            "train_seconds": round(seconds, 3),
            "samples_per_second": result.metrics.get("train_samples_per_second"),
            "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history],
        }
        (Path(c["output"]) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ray.train.report({"global_step": trainer.state.global_step, "train_loss": result.training_loss})


# -- the job ----------------------------------------------------------------------------------
def train_sft(cfg) -> dict[str, Any]:
    """Run SFT described by an ``SFTTrainConfig``; returns the manifest."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cai_ray import runtime
    from cai_ray.config import to_dict
    from cai_ray.stage import model_info

    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows, rejected = sft_rows(cfg.data)
    config = to_dict(cfg)
    fingerprint = sft_fingerprint(config, rows)
    refuse_mixed_run(out, fingerprint)
    manifest = runtime.base_manifest("sft", config)
    manifest["fingerprint"] = fingerprint
    data_manifest = Path(cfg.data) / "manifest.json" if Path(cfg.data).is_dir() else None
    manifest.update(
        data={"path": cfg.data, "rows": len(rows), "rejected_by_reason": rejected,
              "manifest": json.loads(data_manifest.read_text()) if data_manifest and data_manifest.exists() else None},
        base_model=model_info(cfg.model),
    )
    runtime.write_json_atomic(out / "manifest.json", manifest)

    runtime.init_ray(cfg.ray_address)
    use_gpu = cfg.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    loop_config = {
        "rows": rows, "model": cfg.model, "output": str(out), "use_gpu": use_gpu, "zero": cfg.zero,
        "offload": cfg.offload, "seed": cfg.seed, "every_steps": cfg.checkpoint.every_steps,
        "keep": cfg.checkpoint.keep, **config["optim"],
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name="sft",
            storage_path=cfg.checkpoint.storage or str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    plot_loss(metrics["loss_curve"], out / "loss.png", "SFT loss")
    manifest.update(status="finished", finished=runtime.now(), metrics={k: v for k, v in metrics.items() if k != "loss_curve"},
                    timing={"wall_s": round(wall, 3)}, model_dir=str(out / "model"),
                    checkpoint=str(result.checkpoint.path) if result.checkpoint else None)
    runtime.write_json_atomic(out / "manifest.json", manifest)
    return manifest


def sft_fingerprint(config: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoints. The step
    budget (epochs, max_steps) may change: that is how a run is extended."""
    import hashlib

    o = config["optim"]
    return {
        "model": config["model"],
        "data_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
        "seed": config["seed"],
        "zero": config["zero"],
        "workers": config["scaling"]["workers"],  # ZeRO checkpoints are partitioned per rank
        **{k: o[k] for k in ("learning_rate", "per_worker_batch_size", "grad_accum", "max_length", "dtype")},
    }


def refuse_mixed_run(out: Path, fingerprint: dict[str, Any]) -> None:
    """Ray Train resumes any run of the same name and storage; refuse it when the settings
    that shaped the checkpoints changed, instead of silently continuing another run."""
    from cai_ray.runtime import changed_settings

    changed = changed_settings(out / "manifest.json", fingerprint)
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
