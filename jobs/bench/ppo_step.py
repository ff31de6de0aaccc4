"""Seconds per PPO step and the share of each phase, with hf and with vLLM rollouts.

    python jobs/bench/ppo_step.py                          # ~6 min on 2 cores
    python jobs/bench/ppo_step.py --models tiny-random --engines hf --steps 8

Runs the real trainer (`cai-ray train ppo`: one Ray Train worker holding every core, DeepSpeed
ZeRO-2 on CPU) against a preference model of the same architecture (the model with a fresh
one-output head: its scores do not matter for timing), with the per-step phase times the
trainer records itself. The first step (warm-up, and the benign-probe monitor) and the last
(monitor, checkpoint) are left out of the means; the phases of the steps in between are:
rollout (sampling), score (preference model), reference (frozen reference log-probs), values
(rollout-policy log-probs and the value model), advantages, update (ppo_epochs of minibatches
for policy and value model), and with vLLM rollouts sync (the updated weights gathered and
loaded into vLLM). Each model runs once per rollout engine, side by side in this process.
vLLM's CPU build does not refresh a tied lm_head on reload, so vLLM rollouts on CPU need an
untied model: the default is tiny-random-wide (head_dim 64, untied).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PHASES = ("rollout", "sync", "score", "reference", "values", "advantages", "update")


def reward_model(model: str, folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai_ray.models import resolve_model

    path = resolve_model(model)
    out = folder / "rm"
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(model: str, engine: str, args, folder: Path) -> dict:
    import multiprocessing

    from cai_ray.config import load_config
    from cai_ray.train.ppo.config import RLTrainConfig
    from cai_ray.train.ppo.loop import train_rl

    folder.mkdir(parents=True)
    rm = reward_model(model, folder)
    cfg = load_config(
        RLTrainConfig,
        None,
        [
            f"data={ROOT / 'jobs' / 'data' / 'red_team.jsonl'}",
            f"output={folder / 'out'}",
            f"model={model}",
            f"reward.model={rm}",
            "zero=2",
            "scaling.workers=1",
            f"scaling.cpus_per_worker={multiprocessing.cpu_count()}",
            f"ppo.steps={args.steps}",
            f"ppo.rollout_batch={args.rollout_batch}",
            f"ppo.ppo_epochs={args.ppo_epochs}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"optim.per_worker_batch_size={args.minibatch}",
            "optim.max_length=512",
            f"checkpoint.every_steps={args.steps}",
            f"monitor.every={args.steps}",
            "rollout.temperature=1.0",
            f"rollout.engine={engine}",
        ],
    )
    train_rl(cfg)
    history = json.loads((folder / "out" / "metrics.json").read_text())["history"]
    inner = history[1:-1] or history
    mean = {p: sum(h["seconds"].get(p, 0.0) for h in inner) / len(inner) for p in PHASES}
    total = sum(mean.values())
    return {
        "model": model,
        "rollout_engine": engine,
        "steps_measured": len(inner),
        "seconds_per_step": round(total, 3),
        "phase_seconds": {p: round(v, 3) for p, v in mean.items()},
        "phase_share": {p: round(v / total, 3) for p, v in mean.items()},
        "response_tokens": round(sum(h["response_length"] for h in inner) / len(inner), 1),
        "first_step_seconds": round(sum(history[0]["seconds"].values()), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-random-wide", help="comma-separated models")
    p.add_argument("--engines", default="hf,vllm", help="comma-separated rollout engines")
    p.add_argument("--steps", type=int, default=6, help="PPO steps per model (the first and last are not measured)")
    p.add_argument("--rollout-batch", type=int, default=8, help="prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=4)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    from cai_ray.runtime import init_ray

    init_ray(None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for engine in args.engines.split(","):
                results.append(run(model, engine, args, Path(tmp) / f"{model.replace(':', '_')}-{engine}"))
    print(
        f"\nPPO step: {args.rollout_batch} prompts, {args.max_new_tokens} new tokens max, "
        f"{args.ppo_epochs} epochs of minibatch {args.minibatch}, 1 worker, ZeRO-2, CPU"
    )
    print(f"{'model':<18}{'rollouts':<9}{'s/step':>8}  " + "  ".join(f"{p:>10}" for p in PHASES))
    for r in results:
        print(
            f"{r['model']:<18}{r['rollout_engine']:<9}{r['seconds_per_step']:>8.2f}  "
            + "  ".join(f"{r['phase_share'][p]:>10.1%}" for p in PHASES)
        )
    for model in args.models.split(","):
        by = {r["rollout_engine"]: r for r in results if r["model"] == model}
        if "hf" in by and "vllm" in by:
            print(
                f"{model}: s/step vllm / hf = {by['vllm']['seconds_per_step'] / by['hf']['seconds_per_step']:.2f}, "
                f"rollout phase vllm / hf = {by['vllm']['phase_seconds']['rollout'] / by['hf']['phase_seconds']['rollout']:.2f}"
            )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
