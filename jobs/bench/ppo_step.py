"""Seconds per PPO step, side by side in one run: colocated sync, disaggregated sync and async.

    python jobs/bench/ppo_step.py                          # ~6 min on 2 cores: the four modes, vLLM rollouts
    python jobs/bench/ppo_step.py --rollout-batch 2 --minibatch 2 --max-new-tokens 160   # generation-heavy
    python jobs/bench/ppo_step.py --modes colocated --engine hf --models tiny-random --steps 8

Runs the real trainer (`cai-ray train ppo`, DeepSpeed ZeRO-2 on CPU) against a preference
model of the same architecture (the model with a fresh one-output head: its scores do not
matter for timing), with the per-step times the trainer records itself. The modes:

    colocated  one Ray Train worker holding every core; its rollout engine in the same process
               (rollout.placement=colocated): sampling, then training, each with the whole machine
    sync       one trainer worker on one core, one engine actor on another (rollout.placement=pool,
               ppo.mode=sync): each side waits while the other works
    async      the same placement, ppo.mode=async (max_staleness 1): the engine samples batch t+1
               while the trainer updates on batch t
    async-lora async with lora.enabled (rank 16, all linear layers): only the adapters travel
               (vLLM: a LoRARequest per policy version)

Printed per mode: seconds per step (wall, step start to step end), steps/s, the share of the
step the trainer waits for its batch, the share the engine is idle (neither sampling nor taking
weights), and the weight sync's bytes and seconds (the engine's own time receiving and loading;
the trainer's wait in the sync phase, which in async mode includes queueing behind the
generation the engine is running, is in the JSON as sync_wait_seconds). The first step (warm-up, the benign-probe
monitor) and the last (monitor, checkpoint) are left out of the means. vLLM's CPU build does
not refresh a tied lm_head on an in-place reload, so the default model is tiny-random-wide
(head_dim 64, untied).
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
MODES = {
    # mode: (placement, ppo.mode, LoRA)
    "colocated": ("colocated", "sync", False),
    "sync": ("pool", "sync", False),
    "async": ("pool", "async", False),
    "async-lora": ("pool", "async", True),  # the policy trains rank-16 adapters; only they travel
}


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


def run(model: str, mode: str, args, folder: Path) -> dict:
    import multiprocessing

    from cai_ray.config import load_config
    from cai_ray.train.ppo.config import RLTrainConfig
    from cai_ray.train.ppo.loop import train_rl

    folder.mkdir(parents=True)
    rm = reward_model(model, folder)
    placement, ppo_mode, lora = MODES[mode]
    cores = multiprocessing.cpu_count()
    # colocated: the trainer holds every core; pool: the cores split between trainer and engine
    trainer_cpus = cores if placement == "colocated" else max(1, cores // 2)
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
            f"scaling.cpus_per_worker={trainer_cpus}",
            f"ppo.steps={args.steps}",
            f"ppo.rollout_batch={args.rollout_batch}",
            f"ppo.ppo_epochs={args.ppo_epochs}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"optim.per_worker_batch_size={args.minibatch}",
            "optim.max_length=512",
            f"checkpoint.every_steps={args.steps}",
            f"monitor.every={args.steps}",
            "rollout.temperature=1.0",
            f"rollout.engine={args.engine}",
            f"rollout.placement={placement}",
            f"rollout.cpus_per_engine={max(1, cores - trainer_cpus)}",
            f"ppo.mode={ppo_mode}",
            f"lora.enabled={str(lora).lower()}",
            "lora.r=16",
        ],
    )
    train_rl(cfg)
    history = json.loads((folder / "out" / "metrics.json").read_text())["history"]
    inner = history[1:-1] or history

    def mean(f) -> float:
        return sum(f(h) for h in inner) / len(inner)

    step = mean(lambda h: h["step_seconds"])
    phases = {p: mean(lambda h, p=p: h["seconds"].get(p, 0.0)) for p in PHASES}
    out = {
        "model": model,
        "mode": mode,
        "rollout_engine": args.engine,
        "steps_measured": len(inner),
        "seconds_per_step": round(step, 3),
        "steps_per_second": round(1 / step, 4),
        "phase_seconds": {p: round(v, 3) for p, v in phases.items()},
        "response_tokens": round(mean(lambda h: h["response_length"]), 1),
        "first_step_seconds": round(history[0]["step_seconds"], 3),
    }
    if placement == "pool":
        engine_busy = mean(lambda h: h["rollout_engine_seconds"] + h["sync_engine_seconds"])
        out.update(
            trainer_wait_share=round(mean(lambda h: h["rollout_wait_seconds"]) / step, 3),
            engine_idle_share=round(max(0.0, 1 - engine_busy / step), 3),
            sync_mb=round(mean(lambda h: h["sync_bytes"]) / 2**20, 3),
            sync_seconds=round(mean(lambda h: h["sync_engine_seconds"]), 3),  # the engine receiving and loading
            sync_wait_seconds=round(mean(lambda h: h["sync_seconds"]), 3),  # the trainer's, queueing included
            staleness=round(mean(lambda h: h["staleness"]), 2),
        )
    else:
        # colocated: the trainer "waits" for the whole rollout (it is the one sampling)
        out.update(
            trainer_wait_share=round(phases["rollout"] / step, 3),
            engine_idle_share=round(1 - phases["rollout"] / step, 3) if args.engine == "vllm" else None,
            sync_mb=None,
            sync_seconds=round(phases["sync"], 3) if args.engine == "vllm" else None,
            sync_wait_seconds=round(phases["sync"], 3) if args.engine == "vllm" else None,
            staleness=0.0,
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-random-wide", help="comma-separated models")
    p.add_argument("--modes", default="colocated,sync,async,async-lora", help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--engine", default="vllm", choices=("vllm", "hf"), help="rollout engine in every mode")
    p.add_argument("--steps", type=int, default=8, help="PPO steps per mode (the first and last are not measured)")
    p.add_argument("--rollout-batch", type=int, default=8, help="prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")

    from cai_ray.runtime import init_ray

    init_ray(None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for mode in modes:
                results.append(run(model, mode, args, Path(tmp) / f"{model.replace(':', '_')}-{mode}"))
    print(
        f"\nPPO step: {args.rollout_batch} prompts, {args.max_new_tokens} new tokens max, {args.ppo_epochs} "
        f"epoch(s) of minibatch {args.minibatch}, 1 trainer worker, ZeRO-2, CPU, {args.engine} rollouts"
    )
    head = f"{'model':<18}{'mode':<12}{'s/step':>8}{'steps/s':>9}{'trainer waits':>15}{'engine idle':>13}{'sync MB':>9}{'sync s':>8}"
    print(head)
    for r in results:
        idle = "—" if r["engine_idle_share"] is None else f"{r['engine_idle_share']:.1%}"
        print(
            f"{r['model']:<18}{r['mode']:<12}{r['seconds_per_step']:>8.2f}{r['steps_per_second']:>9.3f}"
            f"{r['trainer_wait_share']:>15.1%}{idle:>13}"
            f"{'—' if r['sync_mb'] is None else r['sync_mb']:>9}{'—' if r['sync_seconds'] is None else r['sync_seconds']:>8}"
        )
    for model in args.models.split(","):
        by = {r["mode"]: r for r in results if r["model"] == model}
        if "async" in by and "sync" in by:
            print(
                f"{model}: async / disaggregated sync steps/s = {by['async']['steps_per_second'] / by['sync']['steps_per_second']:.2f}"
            )
        if "async" in by and "async-lora" in by:
            a, b = by["async"], by["async-lora"]
            print(
                f"{model}: weight sync, full vs adapter: {a['sync_mb']} MB in {a['sync_seconds']} s vs "
                f"{b['sync_mb']} MB in {b['sync_seconds']} s ({a['sync_mb'] / b['sync_mb']:.0f}x fewer bytes)"
            )
        if "async" in by and "colocated" in by:
            print(
                f"{model}: async / colocated sync steps/s = {by['async']['steps_per_second'] / by['colocated']['steps_per_second']:.2f}"
            )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
