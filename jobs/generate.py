"""ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/generate_tiny.yaml output=$PWD/out/sl

SL-CAI data: red-team prompts → answer → critique against a sampled principle → revise ×N
→ Parquet, through a Ray Data actor pool of the LLM engine.

On a GPU cluster (8B on vLLM, a million prompts from S3, a pool of 2-16 GPU actors):
    ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . -- \
        python jobs/generate.py --config jobs/configs/generate_gpu.yaml
Without a cluster (a local Ray starts and stops with the script):
    python jobs/generate.py --config jobs/configs/generate_tiny.yaml revisions=2

A token-authenticated cluster needs the token on the client: `eval "$(cluster/local.sh env)"`
for the local one (cluster/README.md for KubeRay). Outputs must be absolute paths every node
reaches: the job runs in Ray's temporary copy of the working dir. Reads every input row,
writes each exactly once (data/*.parquet) or to rejects.jsonl with its reason; resubmitting
the same command resumes. Extra arguments are dotted config overrides.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cai_ray.config import load_config
from cai_ray.generate.config import GenerateConfig  # noqa: E402
from cai_ray.generate.run import generate  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging()

    cfg = load_config(GenerateConfig, args.config, args.overrides)
    manifest = generate(cfg)  # read → claim ids → engine pool (answer, critique, revise) → write
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
