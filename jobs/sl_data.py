"""SL-CAI data: red-team prompts → answer → critique → revise ×N → Parquet.

    ray job submit --working-dir . -- python jobs/sl_data.py --config jobs/configs/sl_data.yaml
    python jobs/sl_data.py --config jobs/configs/sl_data.yaml revisions=2   # local Ray

Reads every input row, writes each exactly once (data/*.parquet) or to rejects.jsonl with
its reason; re-running resumes. Extra arguments are dotted config overrides.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from cai_ray.config import GenerateConfig, load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402
from cai_ray.sl import generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging()

    cfg = load_config(GenerateConfig, args.config, args.overrides)
    manifest = generate(cfg)  # read → claim ids → engine pool (answer, critique, revise) → write
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
