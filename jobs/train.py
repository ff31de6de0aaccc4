"""ray job submit --working-dir . -- python jobs/train.py sft --config jobs/configs/sft_tiny.yaml data=$PWD/out/sl output=$PWD/out/sft

Training on Ray Train + DeepSpeed ZeRO: SFT on the SL-CAI revisions (sft), a preference model
(rm) or DPO (dpo) on the AI labels, RL-CAI (ppo: PPO, or GRPO/RLOO with algo=); the others the same way:
    ray job submit --working-dir . -- python jobs/train.py rm --config jobs/configs/rm_tiny.yaml data=$PWD/out/labels output=$PWD/out/rm
    ray job submit --working-dir . -- python jobs/train.py dpo --config jobs/configs/dpo_tiny.yaml data=$PWD/out/labels output=$PWD/out/dpo
    ray job submit --working-dir . -- python jobs/train.py ppo --config jobs/configs/ppo_tiny.yaml model=$PWD/out/sft/model reward.model=$PWD/out/rm/model output=$PWD/out/ppo

On a GPU cluster (8B, 8 GPU workers over nodes, ZeRO-3, checkpoints on shared storage):
    ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . -- \
        python jobs/train.py sft --config jobs/configs/sft_gpu.yaml
Without a cluster:
    python jobs/train.py rm --config jobs/configs/rm_tiny.yaml optim.max_steps=20

Writes OUTPUT/model (a plain HF model folder), metrics.json, loss.png, rejects.jsonl and
manifest.json. Resubmitting the same command resumes from the last checkpoint; a lost worker
restarts from it (checkpoint.max_failures). Token and absolute paths as in jobs/generate.py.
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
