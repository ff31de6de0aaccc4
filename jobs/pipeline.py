"""ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/demo.yaml output=$PWD/out/pipeline

The whole method as one Ray job: SL-CAI data → SFT → AI labels → preference model → PPO (or
DPO) → eval of base vs SL-CAI vs RL-CAI. The driver only wires the stages; each runs on the
cluster as its own job would (Ray Data actor pools, Ray Train workers, engine actors).

On a GPU cluster (8B policy, 70B labeler and judge on vLLM, a million prompts from S3):
    ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . -- \
        python jobs/pipeline.py --config jobs/configs/pipeline_gpu.yaml
Without a cluster (what `make demo` runs):
    python jobs/pipeline.py --config jobs/configs/demo.yaml rl=dpo

Resubmitting the same command skips the finished stages and resumes the one that stopped;
OUTPUT/pipeline.json holds the lineage of every artifact. Token and absolute paths as in
jobs/generate.py.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cai_ray.config import load_config  # noqa: E402
from cai_ray.pipeline.config import PipelineConfig
from cai_ray.pipeline.run import STAGES, run_pipeline  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--redo", choices=(*STAGES, "rl"), help="delete this stage's output and every later one's, run them again"
    )
    parser.add_argument("--until", choices=(*STAGES, "rl"), help="stop after this stage")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging()

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    state = run_pipeline(cfg, redo=args.redo, until=args.until)
    print(
        json.dumps(
            {
                "status": state["status"],
                "stages": {k: v["status"] for k, v in state["stages"].items()},
                "lineage": str(Path(cfg.output).resolve() / "pipeline.json"),
            }
        )
    )


if __name__ == "__main__":
    main()
