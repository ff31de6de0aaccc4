"""A trained constitutional classifier as a scorer: texts in, P(violation) out.

The model folder is what ``cai-ray classifiers`` writes (``OUTPUT/input/model``,
``OUTPUT/output/model``): a transformers sequence classifier with one output (the logit of
"violates"), its tokenizer beside it. Texts come from ``core.classify.input_text`` /
``output_text``. Long texts keep their end (``truncation_side="left"``): the answer being
streamed is at the end, and the guard must see it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


class TextClassifier:
    def __init__(self, model_dir: str, device: str | None = None, max_length: int = 512, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.truncation_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{model_dir}: a classifier with one output is expected, got {self.model.config.num_labels}"
            )
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.max_length = max_length
        self.batch_size = batch_size
        self.model_dir = model_dir

    def scores(self, texts: Sequence[str]) -> list[float]:
        """P(violation) per text (sigmoid of the logit), batched."""
        import torch

        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(
                list(texts[i : i + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, 0].float()
            out += torch.sigmoid(logits).tolist()
        return out
