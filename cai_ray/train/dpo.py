"""DPO on AI labels: TRL's DPOTrainer under the same Ray Train + DeepSpeed harness.

    labeling output (prompt, chosen, rejected) ─► harness: TorchTrainer(N workers) ─► OUTPUT/model/
                                                  DPOTrainer(policy, frozen reference)

The alternative to preference model + PPO that many users pick. DPO trains on which answer
won; the soft ``p_chosen`` of the labels is not used (``label_smoothing`` is the conservative-
DPO way to say labels are sometimes wrong). The reference model is the base model (with LoRA:
the base with adapters switched off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai_ray.batch.readers import load_rows, pref_row
from cai_ray.train import harness
from cai_ray.train.data import neutralise_rows, reject_long, with_human_labels

load_base = harness.load_causal_lm


def build(job: harness.WorkerJob, work: Path, callbacks: list | None = None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, model = load_base(job)
    lora = harness.lora_config(job, "CAUSAL_LM")
    # the frozen reference: loaded here, before the DeepSpeed config exists, because TRL would
    # load it under ZeRO-3's zero.Init before DeepSpeed's process group is up (and fail);
    # with LoRA the reference is the policy with its adapters off
    ref = None if lora else load_base(job)[1]
    args = harness.training_args(
        DPOConfig, job, work, beta=job.cfg.beta, loss_type=[job.cfg.loss_type], label_smoothing=job.cfg.label_smoothing
    )
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in job.rows]
    return DPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=callbacks or [],
        peft_config=lora,
    )


def train_dpo(cfg) -> dict[str, Any]:
    """Run DPO as a ``DPOTrainConfig`` describes; returns the manifest."""
    from transformers import AutoTokenizer

    from cai_ray.models import resolve_model

    rows, rejects = load_rows(cfg.data, pref_row)
    rows, human = with_human_labels(rows, cfg.data, cfg.human_labels, ties=False)  # DPO cannot take a tie
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    rows, neutralised = neutralise_rows(rows, tok, ("chosen", "rejected"))
    rows, long_rows = reject_long(rows, tok, cfg.optim.max_length, ("chosen", "rejected"))
    settings = {"beta": cfg.beta, "loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing}
    return harness.run(
        "dpo",
        cfg,
        rows,
        rejects + long_rows,
        fingerprint_extra=settings,
        manifest_extra={"neutralised_rows": neutralised, "human_labels": human},
    )
