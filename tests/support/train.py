"""What the unit and the integration tests of train share."""

import json
import random

from cai_ray.config import load_config

KIND = "glad happy kind gentle warm careful calm patient".split()


RUDE = "no stupid awful useless angry dumb lazy rotten".split()


def preference_toy(n: int, p_chosen: float | None = None, seed: int = 0) -> list[dict]:
    """Pairs a model can separate: the chosen answer is built from friendly words, the rejected
    one from rude words, in random orders and lengths (so a random model is at chance)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(3, 6)
        row = {
            "id": f"toy-{i}",
            "prompt": f"Question {i}: can you help me with task {rng.randint(0, 99)}?",
            "chosen": " ".join(rng.choices(KIND, k=k)) + ".",
            "rejected": " ".join(rng.choices(RUDE, k=k)) + ".",
        }
        if p_chosen is not None:
            row["p_chosen"] = p_chosen
        rows.append(row)
    return rows


def _write(path, rows, extra_lines=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra_lines)
    return path


def _cfg(cls, tmp_path, data, **over):
    base = [
        f"data={data}",
        f"output={tmp_path / 'out'}",
        "model=tiny-random",
        "scaling.workers=2",
        "scaling.cpus_per_worker=0.5",
        "optim.max_steps=12",
        "optim.learning_rate=3e-3",
        "optim.per_worker_batch_size=4",
        "checkpoint.every_steps=6",
    ]
    return load_config(cls, None, base + [f"{k}={v}" for k, v in over.items()])
