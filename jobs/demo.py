"""`make demo`: the whole of Constitutional AI on a laptop, with the embedded SmolLM2-135M.

    python jobs/demo.py [--output out/demo] [key=value ...]     (keys of jobs/configs/demo.yaml)

Red-team prompts → critiques and revisions → SFT → AI preference labels → preference model →
PPO → evaluation of base vs SL-CAI vs RL-CAI, then the headline numbers and the report's path.
Re-running skips the finished stages. SmolLM2-135M is far too small to critique itself well:
this shows every stage working and feeding the next on 2 CPU cores; point the config at a 7B+
model on GPUs (jobs/configs/pipeline_gpu.yaml) for a model that actually improves.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai_ray.config import PipelineConfig, load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "out" / "demo"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging("WARNING")

    cfg = load_config(
        PipelineConfig,
        ROOT / "jobs" / "configs" / "demo.yaml",
        [
            f"output={args.output}",
            f"prompts={ROOT / 'jobs' / 'data' / 'red_team_tiny.jsonl'}",
            f"constitution={ROOT / 'constitutions' / 'general.yaml'}",
            f"sft.mix={ROOT / 'jobs' / 'data' / 'helpful.jsonl'}:0.25",
            f"eval.harmful={ROOT / 'jobs' / 'data' / 'red_team_eval.jsonl'}",
            f"eval.benign={ROOT / 'jobs' / 'data' / 'benign.jsonl'}",
            *args.overrides,
        ],
    )
    from cai_ray.evaluate import headline
    from cai_ray.pipeline import run_pipeline, stage_lines

    t0 = time.perf_counter()
    state = run_pipeline(cfg)
    out = Path(cfg.output).resolve()
    print(f"\n=== cai-ray demo: Constitutional AI end to end in {time.perf_counter() - t0:.0f} s ===")
    print("\n".join(stage_lines(state)))
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    print(
        f"\nevaluation ({metrics['prompts']['harmful']} held-out red-team and {metrics['prompts']['benign']} benign "
        f"prompts, judge {metrics['judge']}):"
    )
    print("\n".join("  " + line for line in headline(metrics)))
    report = out / "eval" / "report.html"
    print(f"\nreport:   {report}")
    chromium = shutil.which("chromium")
    if chromium:
        try:
            from cai_ray.report import screenshot

            screenshot(report, out / "eval" / "report.png", chromium=chromium)
            print(f"          {out / 'eval' / 'report.png'} (screenshot)")
        except Exception as e:  # the report is written; a screenshot is a convenience
            print(f"          (no screenshot: {e})")
    print(f"lineage:  {out / 'pipeline.json'}  (which data, config, constitution and model made each artifact)")
    print("SmolLM2-135M is far too small to critique itself: the numbers show the plumbing, not a better model.")


if __name__ == "__main__":
    main()
