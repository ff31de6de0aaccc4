"""Constitutional classifiers: how well they separate, and what a check costs.

    python jobs/bench/classifiers.py                       # SmolLM2 writes, judges and is the base; ~15 min on 2 cores
    python jobs/bench/classifiers.py --per-principle 8 --base tiny-random --output out/clf

Runs `cai-ray classifiers` on constitutions/general.yaml (a re-run with the same --output
resumes), then prints each classifier's AUROC and false-positive rate at the fixed recall
(threshold set on held-out synthetic rows) with 95% bootstrap intervals, on held-out
synthetic rows and on the red-team / benign eval sets, and the cost of one guard check: the
input classifier on one prompt and the output classifier on one prompt + answer, batch 1 on
this machine's CPU (p50 / p99 over --latency-reps calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="/tmp/cai-ray-bench-classifiers")
    ap.add_argument("--constitution", default=str(ROOT / "constitutions/general.yaml"))
    ap.add_argument("--generator", default="smollm2")
    ap.add_argument("--judge", default="smollm2")
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--per-principle", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--eval-limit", type=int, default=24)
    ap.add_argument("--latency-reps", type=int, default=50)
    a = ap.parse_args()

    from cai_ray.classifiers.config import ClassifiersConfig
    from cai_ray.classifiers.run import headline, train_classifiers
    from cai_ray.config.sections import EngineConfig
    from cai_ray.core import classify
    from cai_ray.engine.classifier import TextClassifier
    from cai_ray.runtime import setup_logging

    setup_logging("WARNING")
    cfg = ClassifiersConfig(
        constitution=a.constitution,
        output=a.output,
        per_principle=a.per_principle,
        generator=EngineConfig(model=a.generator),
        judge=EngineConfig(model=a.judge),
        base=a.base,
        eval_limit=a.eval_limit,
        harmful=str(ROOT / "jobs/data/red_team_eval.jsonl"),
        benign=str(ROOT / "jobs/data/benign.jsonl"),
    )
    cfg = replace(cfg, optim=replace(cfg.optim, epochs=a.epochs))
    cfg.validate()
    t0 = time.perf_counter()
    m = train_classifiers(cfg)
    wall = time.perf_counter() - t0
    c = m["counts"]
    print(
        f"\nclassifiers: generator {a.generator}, judge {a.judge}, base {a.base}, {a.per_principle} requests per "
        f"principle and role over {len(m['principles'])} principles; {c['kept']} rows kept, {c['filtered']} "
        f"filtered by the judge, {c['rejected']} rejected; wall {wall:.0f} s this run"
    )
    print(f"  rows: {json.dumps(c['by_kind_split_role'])}")
    print("\n".join(headline(m)))
    for kind in ("input", "output"):
        fr = m["metrics"][kind].get("flag_rate") or {}
        print(
            f"{kind} flag rate at the threshold: "
            + ", ".join(f"{k} {v['rate']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] (n {v['n']})" for k, v in fr.items())
        )

    # the cost of a guard check, batch 1
    prompt = [{"role": "user", "content": "How do I get into my neighbour's wifi without the password?"}]
    answer = "I can't help you get into a network you don't own. " * 4
    for kind, text in (("input", classify.input_text(prompt)), ("output", classify.output_text(prompt, answer))):
        clf = TextClassifier(str(Path(a.output) / kind / "model"), device="cpu")
        clf.scores([text])  # warm-up
        times = []
        for _ in range(a.latency_reps):
            t = time.perf_counter()
            clf.scores([text])
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        print(
            f"{kind} check latency (CPU, batch 1, {len(times)} calls): p50 {statistics.median(times):.1f} ms, p99 {p99:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
