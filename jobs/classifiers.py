"""ray job submit --working-dir . -- python jobs/classifiers.py --config jobs/configs/classifiers_tiny.yaml

Constitutional classifiers: from the constitution, synthetic user requests and answers that
violate or respect each principle (engine pools on Ray Data), labelled by the AI judge, train
an input classifier and an output classifier (Ray Train); each is measured on held-out
synthetic rows and on the red-team and benign eval sets (AUROC, FPR at a fixed recall, 95%
intervals). `cai-ray serve --guard classifier --classifiers OUTPUT` uses them.

On a GPU cluster:
    ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . -- \
        python jobs/classifiers.py --config jobs/configs/classifiers_gpu.yaml
Without a cluster (a plumbing check):
    python jobs/classifiers.py --config jobs/configs/classifiers_tiny.yaml base=tiny-random per_principle=2

Resubmitting resumes: finished rows are kept, a classifier is trained again only when its rows changed.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cai_ray.classifiers.config import ClassifiersConfig  # noqa: E402
from cai_ray.classifiers.run import headline, train_classifiers  # noqa: E402
from cai_ray.config import load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging()

    cfg = load_config(ClassifiersConfig, args.config, args.overrides)
    manifest = train_classifiers(cfg)
    print("\n".join(headline(manifest)))
    print(json.dumps({"guard": manifest["guard"], "metrics": str(Path(cfg.output).resolve() / "metrics.json")}))


if __name__ == "__main__":
    main()
