"""ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/eval_tiny.yaml output=$PWD/out/eval

Evaluation: each model answers red-team and benign prompts; an AI judge scores harmfulness per
constitution principle and refusals (both option orders) and compares every pair of models in
both orders → attack success rate, over-refusal, helpfulness win-rate, Elo, report.html.

On a GPU cluster (the pipeline's 8B checkpoints, a 70B judge on vLLM):
    ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . -- \
        python jobs/eval.py --config jobs/configs/eval_gpu.yaml
Without a cluster:
    python jobs/eval.py --config jobs/configs/eval_tiny.yaml limit=4

Answers are cached per model in OUTPUT/answers/: resubmitting re-judges without re-generating.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cai_ray.config import load_config
from cai_ray.eval.config import EvalConfig  # noqa: E402
from cai_ray.eval.run import evaluate, headline  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging()

    cfg = load_config(EvalConfig, args.config, args.overrides)
    manifest = evaluate(cfg)
    print("\n".join(headline(manifest["metrics"])))
    print(json.dumps({"report": manifest["report"], "metrics": str(Path(cfg.output).resolve() / "metrics.json")}))


if __name__ == "__main__":
    main()
