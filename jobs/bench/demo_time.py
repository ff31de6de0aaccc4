"""Wall time of the whole demo pipeline (what `make demo` runs), stage by stage, against its
20-minute budget on 2 cores.

    python jobs/bench/demo_time.py                 # ~12 min on 2 cores; a fresh run folder
    python jobs/bench/demo_time.py rl=dpo          # any key of jobs/configs/demo.yaml

Runs `cai-ray pipeline --config jobs/configs/demo.yaml` into a new temporary folder (nothing to
skip), with the embedded SmolLM2-135M, and prints each stage's seconds (as pipeline.json records
them), the total including Ray start-up and model loading, and the budget left. `make setup`
(the venv install) is not included: it is a one-time cost measured separately in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BUDGET_S = 20 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from cai_ray.config import load_config
    from cai_ray.pipeline.config import PipelineConfig
    from cai_ray.pipeline.run import run_pipeline
    from cai_ray.runtime import setup_logging

    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="cai-ray-demo-bench-") as tmp:
        os.chdir(ROOT)  # the demo config's paths are relative to the checkout
        t0 = time.perf_counter()
        cfg = load_config(
            PipelineConfig, ROOT / "jobs" / "configs" / "demo.yaml", [f"output={tmp}/run", *args.overrides]
        )
        state = run_pipeline(cfg)
        total = time.perf_counter() - t0
    stages = {k: v["seconds"] for k, v in state["stages"].items()}
    print(f"\n{'stage':<10} {'seconds':>8}")
    for k, s in stages.items():
        print(f"{k:<10} {s:>8.0f}")
    print(
        f"{'total':<10} {total:>8.0f}  ({total / 60:.1f} min of the {BUDGET_S // 60}-minute budget; "
        f"{'within' if total <= BUDGET_S else 'OVER'} budget, {os.cpu_count()} CPUs)"
    )
    print(
        json.dumps(
            {"total_s": round(total, 1), "stages_s": stages, "budget_s": BUDGET_S, "cpus": os.cpu_count(), "rl": cfg.rl}
        )
    )


if __name__ == "__main__":
    main()
