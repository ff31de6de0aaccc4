"""A constitutional classifier: a one-output sequence classifier trained on texts labelled
"violates the constitution" (1) or not (0), soft targets allowed.

    rows (id, text, target in [0, 1]) ─► harness: TorchTrainer(N workers) ─► OUTPUT/model/
                                          HF Trainer + ZeRO, BCE-with-logits     metrics.json, loss.png

``cai-ray classifiers`` writes the rows (synthetic prompts and answers per principle, the AI
judge's labels) and trains an input and an output classifier with this trainer; ``cai-ray
train classifier --data ROWS`` trains one from any file with ``text`` and ``target``. The
score is sigmoid(logit) = P(violation): ``engine.classifier.TextClassifier`` reads the
folder, the serve guard uses it. Transformers' own loss for one float label is MSE
(regression); ``BinaryTrainer`` replaces it with binary cross-entropy, everything else
(batching, ZeRO, checkpoints) stays the Trainer's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cai_ray.batch.readers import load_rows
from cai_ray.train import harness
from cai_ray.train.data import TrainDataError
from cai_ray.train.rm import load_base  # the same one-logit sequence classifier as the preference model


def classifier_row(r: dict) -> tuple[dict | None, str | None]:
    """``text`` (a non-empty string) and ``target`` (a number in [0, 1], or a bool)."""
    text, target = r.get("text"), r.get("target")
    if not isinstance(text, str) or not text.strip():
        return None, "needs 'text', a non-empty string"
    if isinstance(target, bool):
        target = float(target)
    if not isinstance(target, (int, float)) or not math.isfinite(target) or not 0 <= target <= 1:
        return None, f"'target' must be a number in [0, 1], got {target!r}"
    return {"id": r.get("id"), "text": text, "target": float(target)}, None


def _trainer_class():
    import torch.nn.functional as F
    from transformers import Trainer

    class BinaryTrainer(Trainer):
        """Trainer with binary cross-entropy on the one logit (soft targets allowed)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target = inputs.pop("labels").float()
            outputs = model(**inputs)
            logit = outputs.logits[:, 0].float()
            loss = F.binary_cross_entropy_with_logits(logit, target.to(logit.device))
            return (loss, outputs) if return_outputs else loss

    return BinaryTrainer


def build(job: harness.WorkerJob, work: Path, callbacks: list | None = None):
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, TrainingArguments

    tok, model = load_base(job)
    tok.truncation_side = "left"  # as the scorer reads: the end of an answer matters most
    args = harness.training_args(TrainingArguments, job, work, remove_unused_columns=False)
    data = Dataset.from_list([{"text": r["text"], "labels": r["target"]} for r in job.rows])
    data = data.map(
        lambda b: tok(b["text"], truncation=True, max_length=job.cfg.optim.max_length),
        batched=True,
        remove_columns=["text"],
    )
    return _trainer_class()(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        data_collator=DataCollatorWithPadding(tok),
        callbacks=callbacks or [],
    )


def train_classifier(cfg) -> dict[str, Any]:
    """Train the classifier a ``ClassifierTrainConfig`` describes; returns the manifest."""
    rows, rejects = load_rows(cfg.data, classifier_row)
    if len({r["target"] >= 0.5 for r in rows}) < 2:
        raise TrainDataError(f"{cfg.data}: every row has the same class; a classifier needs both")
    pos = sum(r["target"] >= 0.5 for r in rows)
    return harness.run(
        "classifier",
        cfg,
        rows,
        rejects,
        manifest_extra={"classes": {"violates": pos, "respects": len(rows) - pos}},
    )
