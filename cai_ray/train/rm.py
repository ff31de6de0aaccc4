"""The preference (reward) model: a one-output sequence classifier trained on AI labels.

    labeling output (chosen, rejected, p_chosen) ─► split by pair id ─► train: TRL RewardTrainer
                                                                     └► held out: accuracy, calibration

With hard labels the loss is TRL's Bradley–Terry ``-log σ(r_chosen - r_rejected)``. With the
CAI paper's soft labels it is the cross-entropy of ``σ(r_chosen - r_rejected)`` against
``p_chosen``; TRL's RewardTrainer has only a margin, so ``SoftRewardTrainer`` extends it: the
collator carries ``p_chosen`` and ``compute_loss`` replaces the loss, everything else (data
preparation, metrics, checkpoints) stays TRL's. A p_chosen of 1 gives back Bradley–Terry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_ray.batch.readers import load_rows, pref_row
from cai_ray.train import harness
from cai_ray.train.data import TrainDataError, neutralise_rows, reject_long, split, with_human_labels


@dataclass(frozen=True)
class HeldOut:
    """What the preference model's workers need beyond the config: the targets chosen from
    the data (soft p_chosen or hard) and the held-out pairs rank 0 scores after training."""

    soft: bool
    eval_rows: tuple[dict[str, Any], ...]


def load_base(job: harness.WorkerJob):
    from transformers import AutoModelForSequenceClassification

    tok, model = harness.load_model(job, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    return tok, model


def _trainer_classes():
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftPreferenceCollator(DataCollatorForPreference):
        """TRL's preference collator plus the soft target of each pair."""

        def torch_call(self, examples):
            out = super().torch_call(examples)
            out["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float32)
            return out

    class SoftRewardTrainer(RewardTrainer):
        """RewardTrainer with the soft-label loss -(p log σ(d) + (1 - p) log σ(-d)),
        d = r_chosen - r_rejected."""

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p_chosen"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target = inputs.pop("p_chosen")
            _, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
            loss = soft_preference_loss(chosen - rejected, target.to(chosen.device))
            return (loss, outputs) if return_outputs else loss

    return SoftPreferenceCollator, SoftRewardTrainer


def soft_preference_loss(d, p):
    """Cross-entropy of σ(d) against the target probability p (d = r_chosen - r_rejected)."""
    import torch.nn.functional as F

    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


def build(job: harness.WorkerJob, work: Path, callbacks: list | None = None):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tok, model = load_base(job)
    args = harness.training_args(RewardConfig, job, work)
    peft = harness.lora_config(job, "SEQ_CLS")
    if job.extra.soft:
        collator_cls, trainer_cls = _trainer_classes()
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected", "p_chosen")} for r in job.rows]
        return trainer_cls(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            data_collator=collator_cls(pad_token_id=tok.pad_token_id),
            callbacks=callbacks or [],
            peft_config=peft,
        )
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in job.rows]
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=callbacks or [],
        peft_config=peft,
    )


def after_save(job: harness.WorkerJob, model_dir: Path, out: Path) -> dict[str, Any]:
    """Held-out pairwise accuracy and calibration of the saved model (rank 0)."""
    rows = job.extra.eval_rows
    if not rows:
        return {"eval": None}
    margins = score_pairs(str(model_dir), rows, job.use_gpu)
    return {
        "eval": preference_metrics(
            margins, [r["p_chosen"] if job.extra.soft else 1.0 for r in rows], out / "calibration.png"
        )
    }


def score_pairs(model_dir: str, rows: list[dict], use_gpu: bool = False) -> list[float]:
    """r(prompt + chosen) - r(prompt + rejected) for each pair, from a saved preference model
    (contents neutralised for its tokenizer, as in training and in RL scoring)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai_ray.engine import neutralise_messages

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()

    def reward(messages):
        messages = neutralise_messages(messages, tok)
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            return model(**{k: v.to(device) for k, v in ids.items()}).logits[0, 0].float().item()

    return [reward(r["prompt"] + r["chosen"]) - reward(r["prompt"] + r["rejected"]) for r in rows]


def preference_metrics(margins: list[float], targets: list[float], png: Path, bins: int = 10) -> dict[str, Any]:
    """Pairwise accuracy (chosen scored above rejected; pairs labelled 0.5 have no winner and
    are left out) and calibration of σ(margin) against the targets, each pair counted in both
    orders so the figure does not reward always predicting "chosen"."""
    from cai_ray.core.label_math import expected_calibration_error, sigmoid
    from cai_ray.plots import reliability_diagram

    q = [sigmoid(m) for m in margins]
    decided = [(m, t) for m, t in zip(margins, targets) if t != 0.5]
    probs = q + [1 - x for x in q]
    outcomes = list(targets) + [1 - t for t in targets]
    reliability_diagram(
        probs,
        outcomes,
        png,
        bins,
        who="preference model",
        what="P(first answer preferred)",
        items="held-out pair orders",
    )
    return {
        "pairs": len(margins),
        "accuracy": round(sum(1 for m, _ in decided if m > 0) / len(decided), 4) if decided else None,
        "ece": round(expected_calibration_error(probs, outcomes, bins), 4),
        "mean_abs_error": round(sum(abs(a - t) for a, t in zip(q, targets)) / len(q), 4),
        "mean_margin": round(sum(margins) / len(margins), 4),
        "calibration_png": str(png),
    }


def train_rm(cfg) -> dict[str, Any]:
    """Train the preference model an ``RMTrainConfig`` describes; returns the manifest."""
    from transformers import AutoTokenizer

    from cai_ray.models import resolve_model

    rows, rejects = load_rows(cfg.data, pref_row)
    # people's labels (a tie is p_chosen 0.5: only soft targets can take one)
    rows, human = with_human_labels(rows, cfg.data, cfg.human_labels, ties=cfg.targets != "hard")
    with_p = sum(1 for r in rows if r["p_chosen"] is not None)
    if cfg.targets == "soft" and with_p < len(rows):
        raise TrainDataError(
            f"{cfg.data}: targets=soft, but {len(rows) - with_p} of {len(rows)} pairs have no p_chosen"
        )
    if cfg.targets == "auto" and 0 < with_p < len(rows):
        raise TrainDataError(
            f"{cfg.data}: {with_p} of {len(rows)} pairs have p_chosen, the others not; "
            "set targets=hard to train on chosen/rejected alone"
        )
    soft = cfg.targets == "soft" or (cfg.targets == "auto" and with_p == len(rows))
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    rows, neutralised = neutralise_rows(rows, tok, ("chosen", "rejected"))
    rows, long_rows = reject_long(rows, tok, cfg.optim.max_length, ("chosen", "rejected"))
    train, held_out = split(rows, cfg.eval_fraction, cfg.seed)
    if not train:
        raise TrainDataError(f"{cfg.data}: every pair was held out (eval_fraction {cfg.eval_fraction})")
    targets = {"targets": "soft" if soft else "hard", "eval_fraction": cfg.eval_fraction}
    return harness.run(
        "rm",
        cfg,
        train,
        rejects + long_rows,
        extra=HeldOut(soft, tuple(held_out)),
        fingerprint_extra=targets,
        manifest_extra={
            **targets,
            "split": {"train": len(train), "held_out": len(held_out)},
            "neutralised_rows": neutralised,
            "human_labels": human,
        },
    )
