"""`make demo`: the whole of Constitutional AI on a laptop, with the embedded SmolLM2-135M.

    python jobs/demo.py [--output out/demo] [key=value ...]     (keys of jobs/configs/demo.yaml)

Red-team prompts → critiques and revisions → SFT → AI preference labels → preference model →
PPO → evaluation of base vs SL-CAI vs RL-CAI, then the headline numbers and the report's path.
Re-running skips the finished stages. The terminal shows the stage lines, a progress line
every 30 s and the summary; everything else (Ray, DeepSpeed, the engines, progress bars) goes
to OUTPUT/logs/demo.log, and a failing stage prints that log's last lines. SmolLM2-135M is far too small to critique itself well:
this shows every stage working and feeding the next on 2 CPU cores; point the config at a 7B+
model on GPUs (jobs/configs/pipeline_gpu.yaml) for a model that actually improves.
"""

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai_ray.config import load_config  # noqa: E402
from cai_ray.pipeline.config import PipelineConfig  # noqa: E402
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
    from cai_ray.eval.run import headline
    from cai_ray.pipeline.run import run_pipeline, stage_lines
    from cai_ray.runtime import output_to_log, tail

    out = Path(cfg.output).resolve()
    log = out / "logs" / "demo.log"
    t0 = time.perf_counter()
    print(f"cai-ray demo into {out} (logs: {log})", flush=True)
    with output_to_log(log) as console:

        def say(line: str = "") -> None:
            console.write(line + "\n")

        current = {"line": "starting", "since": time.perf_counter()}
        done = threading.Event()

        def stage_line(line: str) -> None:
            current.update(line=line.replace("[pipeline] ", ""), since=time.perf_counter())
            say(line)

        def ticker() -> None:  # progress on long stages
            while not done.wait(30):
                say(
                    f"    ... {current['line'].split(':')[0]} running for {time.perf_counter() - current['since']:.0f} s"
                )

        threading.Thread(target=ticker, daemon=True).start()
        try:
            state = run_pipeline(cfg, say=stage_line)
        except BaseException as e:
            done.set()
            say(f"\nthe demo stopped in {current['line'].split(':')[0]}: {type(e).__name__}: {e}")
            say(f"last lines of {log}:\n{tail(log)}")
            raise SystemExit(1) from None
        done.set()
        say(f"\n=== cai-ray demo: Constitutional AI end to end in {time.perf_counter() - t0:.0f} s ===")
        say("\n".join(stage_lines(state)))
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        say(
            f"\nevaluation ({metrics['prompts']['harmful']} held-out red-team and {metrics['prompts']['benign']} "
            f"benign prompts, judge {metrics['judge']}; [95% intervals], differences to {metrics['baseline']} "
            "in points, n.s. = not significant):"
        )
        say("\n".join("  " + line for line in headline(metrics)))
        report = out / "eval" / "report.html"
        say(f"\nreport:   {report}")
        chromium = shutil.which("chromium")
        if chromium:
            try:
                from cai_ray.eval.report import screenshot

                screenshot(report, out / "eval" / "report.png", chromium=chromium)
                say(f"          {out / 'eval' / 'report.png'} (screenshot)")
            except Exception as e:  # the report is written; a screenshot is a convenience
                say(f"          (no screenshot: {e})")
        say(f"lineage:  {out / 'pipeline.json'}  (which data, config, constitution and model made each artifact)")
        say(f"logs:     {log}")
        say("SmolLM2-135M is far too small to critique itself: the numbers show the plumbing, not a better model.")


if __name__ == "__main__":
    main()
