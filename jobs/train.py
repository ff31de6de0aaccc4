"""Training on Ray Train + DeepSpeed: SFT on SL-CAI revisions, preference model or DPO on AI labels.

    ray job submit --working-dir . -- python jobs/train.py sft --config jobs/configs/sft_gpu.yaml
    python jobs/train.py rm --config jobs/configs/rm.yaml optim.max_steps=20   # local Ray

Writes OUTPUT/model (a plain HF model folder), metrics.json, loss.png, rejects.jsonl and
manifest.json. Re-running the same command resumes from the last checkpoint. Extra
arguments are dotted config overrides.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cai_ray.config import load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402
from cai_ray.train import TRAINERS, trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trainer", choices=sorted(TRAINERS))
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging()

    cls, run = trainer(args.trainer)
    manifest = run(load_config(cls, args.config, args.overrides))
    print(json.dumps({"data": manifest["data"], "metrics": manifest["metrics"], "model": manifest["model_dir"]}))


if __name__ == "__main__":
    main()
