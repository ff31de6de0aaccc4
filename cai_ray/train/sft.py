"""SFT on the SL-CAI revisions: TRL's SFTTrainer on Ray Train workers under DeepSpeed ZeRO.

    SL output (messages) ─► prompt/completion rows ─┬─► harness: TorchTrainer(N workers) ─► OUTPUT/model/
    --mix helpful.jsonl:0.25 ─► helpfulness rows ───┘   SFTTrainer + ZeRO (+ LoRA)          metrics.json, loss.png

Rows are conversational prompt/completion pairs (the completion is the final assistant
turn), so only the answer is trained (TRL's completion-only loss). The paper mixes helpful
samples in with the revisions so the model stays helpful: ``mix`` does that at a ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai_ray.batch.readers import load_rows
from cai_ray.train import harness
from cai_ray.train.data import mix_in, neutralise_rows, reject_long, sft_row

load_base = harness.load_causal_lm


def build(job: harness.WorkerJob, work: Path, callbacks: list | None = None):
    """TRL SFTTrainer for one worker, from plain values (``c``)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok, model = load_base(job)
    args = harness.training_args(SFTConfig, job, work, completion_only_loss=True)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_trainable(job.rows)),
        processing_class=tok,
        callbacks=callbacks or [],
        peft_config=harness.lora_config(job, "CAUSAL_LM"),
    )


def _trainable(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def train_sft(cfg) -> dict[str, Any]:
    """Run SFT described by an ``SFTTrainConfig``; returns the manifest."""
    from transformers import AutoTokenizer

    from cai_ray.models import resolve_model
    from cai_ray.runtime import file_sha256
    from cai_ray.train.config import parse_mix

    rows, rejects = load_rows(cfg.data, sft_row)
    extra: dict[str, Any] = {}
    if cfg.mix:
        path, ratio = parse_mix(cfg.mix)
        helpful, helpful_rejects = load_rows(path, sft_row)
        for r in helpful:
            r["id"] = f"mix:{r['id']}"
        rows, info = mix_in(rows, helpful, ratio, cfg.seed)
        rejects += helpful_rejects
        extra["mix"] = {
            "path": path,
            "sha256": file_sha256(path) if Path(path).is_file() else None,
            "ratio": ratio,
            **info,
        }
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    rows, extra["neutralised_rows"] = neutralise_rows(rows, tok, ("completion",))
    rows, long_rows = reject_long(rows, tok, cfg.optim.max_length, ("completion",))
    return harness.run("sft", cfg, rows, rejects + long_rows, fingerprint_extra={"mix": cfg.mix}, manifest_extra=extra)
