"""A `cai-ray classifiers` OUTPUT folder for the serve guard's tests and benchmark, built in
seconds: one tiny sequence classifier (tiny-random's shape and tokenizer, one output) trained
in plain torch to flag any text holding a planted word, saved as both the input and the
output classifier, with the ``guard.json`` the real step writes.

The planted word is what makes the guard's behaviour controllable with a real engine: put it
in a prompt and the input check refuses it; pick a word the policy greedily writes a dozen
tokens into one answer (and not into another) and the output check cuts that answer there.

    python -m tests.support.guard OUT --planted Fourteenth      # the folder for jobs/bench/guard.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cai_ray.core.classify import input_text, output_text

THRESHOLD = 0.5
# a word tiny-random greedily writes two dozen tokens into its answer to "Tell me about
# cats." and never into its answer to "Hello!" (tests/integration/test_serve_guard.py checks it)
PLANTED = "Fourteenth"
SEED = 0


def _words(tok, rng: random.Random, planted_ids: set[int], n: int = 4000) -> list[str]:
    """Whole-word vocabulary entries (a leading space, letters only), the planted one left out."""
    out = []
    while len(out) < n:
        i = rng.randrange(len(tok))
        piece = tok.convert_ids_to_tokens(i)
        if i not in planted_ids and piece.startswith("Ġ") and piece[1:].isalpha():
            out.append(piece[1:])
    return out


def _texts(words: list[str], planted: str, rng: random.Random, n: int) -> tuple[list[str], list[float]]:
    """Conversations as the classifiers read them (input and output texts, prefixes of
    answers), half with the planted word somewhere (prompt or answer), half without."""
    texts, labels = [], []
    for i in range(n):
        prompt = rng.sample(words, rng.randint(2, 10))
        answer = rng.sample(words, rng.randint(0, 40))
        flagged = i % 2 == 1
        if flagged:
            where = prompt if rng.random() < 0.3 or not answer else answer
            where.insert(rng.randint(0, len(where)), planted)
        msgs = [{"role": "user", "content": " ".join(prompt)}]
        texts.append(input_text(msgs) if rng.random() < 0.2 else output_text(msgs, " ".join(answer)))
        labels.append(float(flagged and (planted in texts[-1])))
    return texts, labels


def train_flagger(model_name: str, planted: str, steps: int = 60, batch: int = 32):
    """(model, tokenizer): a sequence classifier (one logit) that scores texts holding
    ``planted`` high and others low. Seeded: the same weights each run."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from cai_ray.models import resolve_model

    folder = resolve_model(model_name)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.truncation_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config = AutoConfig.from_pretrained(folder, num_labels=1)
    config.initializer_range = 0.02  # tiny-random's 0.3 is for varied generations, not for learning
    config.pad_token_id = tok.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config)
    planted_ids = set(tok(" " + planted, add_special_tokens=False)["input_ids"])
    words = _words(tok, rng, planted_ids)
    texts, labels = _texts(words, planted, rng, steps * batch)
    # frozen random embeddings: the planted token's is already distinct, attention learns to
    # find it; training the 49k-row table too is slower and separates worse
    model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests' CPUs are shared; one thread is as fast for this size
    model.train()
    try:
        _train(model, tok, opt, texts, labels, steps, batch)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, tok


def _train(model, tok, opt, texts, labels, steps, batch):
    import torch

    for step in range(steps):
        enc = tok(
            texts[step * batch : (step + 1) * batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=256,
        )
        y = torch.tensor(labels[step * batch : (step + 1) * batch])
        logits = model(**enc).logits[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def write_guard_folder(out: Path, model, tok, threshold: float = THRESHOLD, constitution=None) -> Path:
    """OUTPUT/{input,output}/model + guard.json, as `cai-ray classifiers` writes them."""
    out = Path(out)
    for kind in ("input", "output"):
        model.save_pretrained(out / kind / "model")
        tok.save_pretrained(out / kind / "model")
    spec = {
        "input": {"model": "input/model", "threshold": threshold, "target_recall": 0.9},
        "output": {"model": "output/model", "threshold": threshold, "target_recall": 0.9},
        "constitution": {
            "name": constitution.name if constitution else "general",
            "sha256": constitution.sha256 if constitution else "",
        },
    }
    (out / "guard.json").write_text(json.dumps(spec, indent=2))
    return out


def build_guard_folder(out: Path, planted: str, model_name: str = "tiny-random", constitution=None) -> Path:
    model, tok = train_flagger(model_name, planted)
    return write_guard_folder(out, model, tok, constitution=constitution)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--planted", default=PLANTED)
    ap.add_argument("--constitution", default="constitutions/general.yaml")
    a = ap.parse_args()
    from cai_ray.core.constitution import load_constitution

    print(build_guard_folder(Path(a.out), a.planted, constitution=load_constitution(a.constitution)))
