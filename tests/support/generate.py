"""What the unit and the integration tests of generate share."""

import json
from pathlib import Path

from cai_ray.config import load_config
from cai_ray.generate.config import GenerateConfig

ROOT = Path(__file__).resolve().parents[2]


TINY = [
    "engine.model=tiny-random",
    "engine.dtype=float32",
    "engine.threads=1",
    "sampling.max_new_tokens=8",
    "revisions=2",
    "pool.batch_size=4",
    "outputs.rows_per_file=4",
]


def run(inp, out, *extra):
    from cai_ray.generate.run import generate

    cfg = load_config(GenerateConfig, None, [f"input={inp}", f"output={out}", *TINY, *extra])
    return generate(cfg)


def write_prompts(path: Path, n: int, extra_lines=()):
    lines = [
        json.dumps({"prompt": f"Question number {i}: how do I stay safe online?", "category": "c"}) for i in range(n)
    ]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path
