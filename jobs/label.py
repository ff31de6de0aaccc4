"""ray job submit --working-dir . -- python jobs/label.py --config jobs/configs/label_tiny.yaml output=$PWD/out/labels

RL-CAI preference labels: prompts (or ready-made pairs) → k answers from the policy → the AI
labeler's soft, position-debiased preference per principle → Parquet.

On a GPU cluster (8B policy and 70B labeler on vLLM, a million prompts from S3):
    ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . -- \
        python jobs/label.py --config jobs/configs/label_gpu.yaml
Without a cluster:
    python jobs/label.py --config jobs/configs/label_tiny.yaml method.principles_per_pair=2

Token, absolute outputs and resume as in jobs/generate.py. Every input row ends up written
(its pairs in data/ or filtered/) or in rejects.jsonl with its reason.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cai_ray.config import load_config
from cai_ray.label.config import LabelConfig  # noqa: E402
from cai_ray.label.run import label  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging()

    cfg = load_config(LabelConfig, args.config, args.overrides)
    manifest = label(cfg)  # read → claim → [policy pool: k answers] → labeler pool → write
    print(json.dumps({"counts": manifest["counts"], "labels": manifest["labels"], "gold": manifest.get("gold")}))


if __name__ == "__main__":
    main()
