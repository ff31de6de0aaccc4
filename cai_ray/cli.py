"""`cai-ray`: one entry point, one sub-command per stage. Imports only what a command needs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config_epilog(cls) -> str:
    from cai_ray.config import describe

    rows = describe(cls)
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (YAML file or key=value overrides; default, meaning):"]
    lines += [f"  {k:<{width}}  {d:<14} {h}" for k, d, h in rows]
    return "\n".join(lines)


def _actors(value: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--actors expects MIN,MAX or N, got {value!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise argparse.ArgumentTypeError(f"--actors expects 1 <= MIN <= MAX, got {value!r}")
    return parts[0], parts[1]


def _clamp(value: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clamp expects LO,HI (e.g. 0.4,0.6), got {value!r}") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    from cai_ray.classifiers.config import ClassifiersConfig
    from cai_ray.eval.config import EvalConfig
    from cai_ray.generate.config import GenerateConfig
    from cai_ray.label.config import LabelConfig
    from cai_ray.pipeline.config import PipelineConfig
    from cai_ray.serve.config import ServeConfig
    from cai_ray.train.config import ClassifierTrainConfig, DPOTrainConfig, RMTrainConfig, SFTTrainConfig
    from cai_ray.train.ppo.config import RLTrainConfig

    parser = argparse.ArgumentParser(prog="cai-ray", description="Constitutional AI at cluster scale on Ray.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="SL-CAI data: answer → critique → revise ×N on Ray Data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_epilog(GenerateConfig),
        description="Turn a file of red-team prompts into an SL-CAI dataset "
        "(Parquet + rejects.jsonl + manifest.json). Re-running resumes.",
    )
    g.add_argument("--input", help="prompt file, folder or cloud URI (s3://bucket/prefix/)")
    g.add_argument("--output", help="output folder")
    g.add_argument("--config", help="YAML config file (see config keys below)")
    g.add_argument("--constitution", help="constitution YAML")
    g.add_argument("--model", dest="engine.model", metavar="MODEL", help="smollm2 | tiny-random | model folder")
    g.add_argument("--engine", dest="engine.backend", choices=["hf", "vllm"], help="engine backend")
    g.add_argument("--revisions", type=int, metavar="N", help="critique/revision rounds")
    g.add_argument(
        "--direct", action="store_const", const=False, dest="critique", help="direct revision without a critique"
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        dest="sampling.max_new_tokens",
        metavar="N",
        help="token budget per answer, critique and revision",
    )
    g.add_argument("--actors", type=_actors, metavar="MIN,MAX", help="engine actor pool size: MIN,MAX (or N)")
    g.add_argument("--batch-size", type=int, dest="pool.batch_size", metavar="N", help="rows per engine call")
    g.add_argument("--seed", type=int)
    g.add_argument("--address", dest="ray_address", help="Ray cluster address (default: start local)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    lab = sub.add_parser(
        "label",
        help="RL-CAI preference labels (RLAIF): soft, position-debiased AI labels on Ray Data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_epilog(LabelConfig),
        description="Label answer pairs with an AI labeler against the constitution: "
        "P(A) vs P(B) after 'The answer is: (', both orders, principle ensembles, optional "
        "clamped chain of thought. Input: prompts (with --policy, k answers are sampled) or "
        "ready-made pairs (prompt|messages, response_a, response_b). Re-running resumes.",
    )
    lab.add_argument("--input", help="prompts or ready-made pairs (file, folder or cloud URI)")
    lab.add_argument("--output", help="output folder")
    lab.add_argument("--config", help="YAML config file (see config keys below)")
    lab.add_argument("--constitution", help="constitution YAML")
    lab.add_argument(
        "--policy",
        dest="policy.model",
        metavar="MODEL",
        help="model that samples k answers per prompt (omit when the input holds pairs)",
    )
    lab.add_argument("--labeler", dest="labeler.model", metavar="MODEL", help="the AI labeler model")
    lab.add_argument("--samples", type=int, dest="pairs.samples", metavar="K", help="answers per prompt (k >= 2)")
    lab.add_argument("--pairing", dest="pairs.pairing", choices=["all", "disjoint"], help="pairs from the k answers")
    lab.add_argument(
        "--principles-per-pair",
        type=int,
        dest="method.principles_per_pair",
        metavar="K",
        help="principle ensemble size",
    )
    lab.add_argument(
        "--cot", action="store_const", const=True, dest="method.cot", help="chain-of-thought labels (clamped)"
    )
    lab.add_argument("--clamp", type=_clamp, metavar="LO,HI", help="CoT clamp range (default 0.4,0.6)")
    lab.add_argument(
        "--min-margin", type=float, dest="filter.min_margin", metavar="X", help="keep pairs with |p_a - 0.5| >= X"
    )
    lab.add_argument(
        "--drop-inconsistent",
        action="store_const",
        const=True,
        dest="filter.drop_inconsistent",
        help="filter pairs whose two orders disagree",
    )
    lab.add_argument(
        "--gold", help="pairs with a known answer (prompt, chosen, rejected): accuracy, ECE, reliability PNG"
    )
    lab.add_argument("--actors", type=_actors, metavar="MIN,MAX", help="labeler actor pool size")
    lab.add_argument(
        "--batch-size", type=int, dest="labeler_pool.batch_size", metavar="N", help="pairs per labeler call"
    )
    lab.add_argument("--seed", type=int)
    lab.add_argument("--address", dest="ray_address", help="Ray cluster address (default: start local)")
    lab.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    tr = sub.add_parser("train", help="training on Ray Train with DeepSpeed ZeRO")
    tsub = tr.add_subparsers(dest="trainer", required=True)
    sft = _train_parser(
        tsub,
        "sft",
        SFTTrainConfig,
        "supervised fine-tuning on SL-CAI revisions (TRL SFTTrainer, completion-only loss)",
        "Fine-tune a model on the SL-CAI output (or any messages / prompt+completion file) with Ray "
        "Train workers and DeepSpeed ZeRO, optionally with LoRA and helpfulness data mixed in.",
        "SL-CAI output folder or a JSONL/Parquet file",
    )
    sft.add_argument(
        "--mix",
        metavar="FILE:RATIO",
        help="mix helpfulness rows in as RATIO of the mixed set (e.g. helpful.jsonl:0.25)",
    )
    rm = _train_parser(
        tsub,
        "rm",
        RMTrainConfig,
        "preference (reward) model on AI labels (TRL RewardTrainer; soft labels or Bradley-Terry)",
        "Train a one-output sequence classifier on preference pairs: cross-entropy against the "
        "labeler's p_chosen (soft), or Bradley-Terry on chosen > rejected (hard). Holds out "
        "eval_fraction of the pairs and reports pairwise accuracy and calibration (calibration.png).",
        "labeling output folder, or JSONL/Parquet with prompt, chosen, rejected [, p_chosen]",
    )
    rm.add_argument("--targets", choices=["auto", "soft", "hard"], help="soft labels (p_chosen) or hard (default auto)")
    dpo = _train_parser(
        tsub,
        "dpo",
        DPOTrainConfig,
        "Direct Preference Optimisation on AI labels (TRL DPOTrainer)",
        "Train the policy directly on preference pairs with DPO (reference = the base model).",
        "labeling output folder, or JSONL/Parquet with prompt, chosen, rejected",
    )
    dpo.add_argument("--beta", type=float, help="DPO beta")
    ppo = _train_parser(
        tsub,
        "ppo",
        RLTrainConfig,
        "RL-CAI: PPO against the preference model with a KL penalty to the SFT policy (or --algo grpo|rloo)",
        "Optimise the SFT policy against a reward: the preference model (--reward-model), a reward "
        "function (reward.function=FILE.py:NAME) or the AI labeler comparing each answer with a "
        "reference answer (d-RLAIF: reward.labeler.model=MODEL). PPO runs ours (value model from the "
        "preference model, GAE, clipped losses, KL penalty fixed or adaptive) on Ray Train workers "
        "under DeepSpeed ZeRO; --algo grpo|rloo (critic-free: ppo.group_size answers per prompt are the "
        "baseline) runs in the same loop with --async or rollout.placement=pool, else through TRL's "
        "GRPOTrainer/RLOOTrainer, with the same reward. Per step: metrics (reward, KL, entropy, clip fraction, value loss, length, phase "
        "times) in steps.jsonl and ppo.png, Goodhart monitors (top n-gram share, refusal rate on "
        "benign probes), sampled answers in samples.jsonl; OUTPUT/value holds the value model. "
        "--async samples from a pool of engine actors beside the trainers while they update "
        "(rollout.placement=pool ppo.mode=async; ppo.max_staleness bounds the lag); lora.enabled=true "
        "trains adapters and sends only them to the rollout engines.",
        "prompts: JSONL/Parquet with prompt or messages [, reference]",
        data_flag="--prompts",
        model_flag="--policy",
    )
    ppo.add_argument(
        "--reward-model", dest="reward.model", metavar="RM_DIR", help="preference model folder (train rm OUTPUT/model)"
    )
    ppo.add_argument("--algo", choices=["ppo", "grpo", "rloo"], help="RL algorithm (default ppo)")
    ppo.add_argument(
        "--async",
        dest="async_rollouts",
        action="store_true",
        help="asynchronous RL (PPO, GRPO, RLOO): rollout.placement=pool ppo.mode=async (the engines sample while the trainers update)",
    )
    ppo.add_argument(
        "--kl-coef",
        type=float,
        dest="ppo.kl_coef",
        metavar="B",
        help="KL penalty beta (initial beta with --adaptive-kl)",
    )
    ppo.add_argument(
        "--adaptive-kl",
        type=float,
        dest="ppo.adaptive_kl",
        metavar="TARGET",
        help="adapt beta towards this KL per response",
    )
    ppo.add_argument(
        "--rollout-batch", type=int, dest="ppo.rollout_batch", metavar="N", help="prompts per step (all workers)"
    )
    ppo.add_argument(
        "--ppo-epochs", type=int, dest="ppo.ppo_epochs", metavar="N", help="passes over each rollout batch"
    )
    ppo.add_argument("--steps", type=int, dest="ppo.steps", metavar="N", help="RL steps")
    ppo.add_argument(
        "--max-new-tokens", type=int, dest="rollout.max_new_tokens", metavar="N", help="tokens per response"
    )

    _train_parser(
        tsub,
        "classifier",
        ClassifierTrainConfig,
        "a constitutional classifier: P(violation) from one logit (binary cross-entropy)",
        "Train a one-output sequence classifier on rows with text and target (1 = violates the constitution, "
        "0 = respects it; soft targets allowed). `cai-ray classifiers` trains its input and output classifiers "
        "with this trainer.",
        "JSONL/Parquet with text and target",
    )

    srv = sub.add_parser(
        "serve",
        help="serve the policy (OpenAI-compatible), the AI labeler and the guardrail on Ray Serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_epilog(ServeConfig),
        description="Start a Ray Serve app: POST /v1/chat/completions (OpenAI schema, streaming), "
        "GET /v1/models, POST /v1/label (soft label, both orders), POST /v1/critique, the reward "
        "service (POST /v1/reward, /v1/reward/openrlhf for OpenRLHF's --reward.remote_url, /classify "
        "in vLLM's shape; reward.model=RM_DIR adds the preference model), GET /healthz. "
        "Every model route needs 'Authorization: Bearer KEY' (KEY from $CAI_RAY_API_KEY or "
        "--api-key-file). Binds 127.0.0.1 unless --host says otherwise. Runs until Ctrl-C.",
    )
    srv.add_argument(
        "--policy", dest="policy.model", metavar="MODEL", help="the served model (a trained OUTPUT/model folder works)"
    )
    srv.add_argument("--labeler", dest="labeler.model", metavar="MODEL", help="labeler model (default: the policy)")
    srv.add_argument("--constitution", help="constitution YAML")
    srv.add_argument("--host", help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="HTTP port (default 8000)")
    srv.add_argument("--api-key-file", dest="api_key_file", help="file holding the bearer token")
    srv.add_argument("--guardrail", action="store_const", const=True, help="critique and revise every answer")
    srv.add_argument(
        "--guard",
        choices=("none", "classifier"),
        help="classifier: constitutional classifiers check each prompt and the answer as it streams",
    )
    srv.add_argument(
        "--classifiers",
        dest="classifier.path",
        metavar="DIR",
        help="the guard's classifiers: a `cai-ray classifiers` OUTPUT folder (with guard.json)",
    )
    srv.add_argument("--config", help="YAML config file (see config keys below)")
    srv.add_argument("--address", dest="ray_address", help="Ray cluster address (default: start local)")
    srv.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    rv = sub.add_parser(
        "review",
        help="a page where people label the pairs the AI labeler is least sure of (HRLAIF)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a review page over OUTPUT/review/queue.jsonl (the pairs `cai-ray label` queued because "
        "the AI labeler was unsure: its two orders disagree, its margin is small, its principles disagree, or it "
        "gave no label). The page shows one pair at a time, most unsure first: the prompt, answers A and B side by "
        "side, the principles asked, the AI's lean and why it is unsure, and the progress. Each pair handed to a "
        "reviewer is leased to them (--lease-minutes) so two reviewers never label the same pair at once; when "
        "every pair has a label the page offers second opinions on pairs others labelled. Binds 127.0.0.1 unless "
        "--host says otherwise; runs until Ctrl-C.",
        epilog="keys on the page:\n"
        "  a or 1  A is better        b or 2  B is better        t or 3  tie\n"
        "  s       skip (off your list; others still see it)     u or Backspace  undo your last label\n"
        "\n"
        "files (in OUTPUT/review/):\n"
        "  queue.jsonl   the pairs to review (read; re-read when `cai-ray label` rewrites it)\n"
        "  labels.jsonl  every label and undo, appended and fsynced before the page is answered: stopping the\n"
        "                browser or the server loses nothing, and a restarted server reads it back\n"
        "  server.log    the server's log\n"
        "\n"
        "auth: the page asks for a user name and a password: the user name is your reviewer name (it goes into\n"
        "labels.jsonl), the password is the key ($CAI_RAY_API_KEY or --api-key-file, >= 16 characters). Scripts\n"
        "may send 'Authorization: Bearer KEY' with a reviewer query or JSON field instead. /healthz is open.\n"
        "\n"
        "example:\n"
        "  export CAI_RAY_API_KEY=$(openssl rand -hex 16)\n"
        "  cai-ray review out/label              # then open http://127.0.0.1:8900/",
    )
    rv.add_argument("output", metavar="OUTPUT", help="a `cai-ray label` output folder (with review/queue.jsonl)")
    rv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    rv.add_argument("--port", type=int, default=8900, help="HTTP port (default 8900)")
    rv.add_argument("--api-key-file", metavar="FILE", help="file holding the key (default: $CAI_RAY_API_KEY)")
    rv.add_argument(
        "--lease-minutes",
        type=float,
        default=10.0,
        metavar="M",
        help="how long a pair shown to one reviewer is held from the others (default 10; renewed on each visit)",
    )
    rv.add_argument(
        "--no-auth",
        action="store_false",
        dest="auth",
        help="no key (127.0.0.1 only): reviewers still give their name as the user name",
    )

    ev = sub.add_parser(
        "eval",
        help="evaluate models: harmlessness, over-refusal, helpfulness win-rate, Elo; report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_epilog(EvalConfig),
        description="Each model answers the red-team and the benign prompts; an AI judge scores every answer "
        "(P(harmful) per constitution principle, P(refuses)) and compares every pair of models in both orders. "
        "Writes metrics.json, report.html with PNG plots, answers.jsonl, comparisons.jsonl, rejects.jsonl and "
        "manifest.json. Answers are cached per model: a re-run re-judges without re-generating.",
    )
    ev.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="[NAME=]MODEL",
        help="a model to evaluate (repeat: --model base=smollm2 --model rl-cai=out/ppo/model)",
    )
    ev.add_argument(
        "--baseline", metavar="NAME|MODEL", help="the model the others are compared with (default: the first)"
    )
    ev.add_argument("--harmful", help="red-team prompts (JSONL/Parquet: prompt|messages [, id, category])")
    ev.add_argument("--benign", help="benign prompts (same format)")
    ev.add_argument("--output", help="output folder")
    ev.add_argument("--judge", dest="judge.model", metavar="MODEL", help="the AI judge (default smollm2)")
    ev.add_argument("--constitution", help="constitution YAML")
    ev.add_argument("--limit", type=int, metavar="N", help="first N prompts of each file")
    ev.add_argument(
        "--columns",
        metavar="OURS=THEIRS,...",
        help="map your files' columns, e.g. prompt=goal,category=harm_type,source=dataset",
    )
    ev.add_argument("--max-new-tokens", type=int, dest="sampling.max_new_tokens", metavar="N", help="tokens per answer")
    ev.add_argument("--config", help="YAML config file (see config keys below)")
    ev.add_argument("--address", dest="ray_address", help="Ray cluster address (default: start local)")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    pl = sub.add_parser(
        "pipeline",
        help="the whole method: SL-CAI data → SFT → AI labels → preference model → PPO/DPO → eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_epilog(PipelineConfig),
        description="Run every stage in turn, each one's output feeding the next, into one run folder with "
        "pipeline.json (the lineage of every artifact). A finished stage is skipped on a re-run; a crashed one "
        "resumes. Each stage section of the config takes that job's own keys (see `cai-ray generate --help`, ...).",
    )
    pl.add_argument("--config", help="pipeline YAML (e.g. jobs/configs/demo.yaml)")
    pl.add_argument("--output", help="run folder")
    pl.add_argument("--model", help="base model")
    pl.add_argument("--prompts", help="red-team prompt file")
    pl.add_argument("--rl", choices=["ppo", "dpo"], help="RL-CAI by PPO against a preference model, or DPO")
    pl.add_argument("--redo", metavar="STAGE", help="delete STAGE's output and every later stage's, and run them again")
    pl.add_argument("--until", metavar="STAGE", help="stop after STAGE (generate|sft|label|rm|ppo or dpo|eval)")
    pl.add_argument("--address", dest="ray_address", help="Ray cluster address (default: start local)")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sft.optim.epochs=2")

    cl = sub.add_parser(
        "classifiers",
        help="constitutional classifiers: synthetic data per principle → AI labels → input and output classifiers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_epilog(ClassifiersConfig),
        description="From a constitution, the generator writes user requests that violate or respect each principle "
        "and answers that violate or respect it (Ray Data engine pools; each row keeps its principle and role), the "
        "AI judge labels every row (rows it confidently contradicts are filtered), and an input classifier (the "
        "request) and an output classifier (the answer and its prefixes) are trained on Ray Train. Each is measured "
        "on held-out synthetic rows (AUROC; the threshold that reaches `recall` and its false-positive rate) and on "
        "the red-team and benign eval sets, with bootstrap intervals. Writes guard.json for `cai-ray serve --guard "
        "classifier --classifiers OUTPUT`, metrics.json, data/, filtered.jsonl, rejects.jsonl and manifest.json. "
        "Re-running resumes.\n\nexample:\n  cai-ray classifiers --constitution constitutions/general.yaml "
        "--output out/classifiers --per-principle 16",
    )
    cl.add_argument("--constitution", help="constitution YAML")
    cl.add_argument("--output", help="output folder")
    cl.add_argument("--config", help="YAML config file (see config keys below)")
    cl.add_argument("--generator", dest="generator.model", metavar="MODEL", help="model writing the synthetic data")
    cl.add_argument("--judge", dest="judge.model", metavar="MODEL", help="the AI judge that labels the rows")
    cl.add_argument("--base", metavar="MODEL", help="classifier base model (default smollm2)")
    cl.add_argument(
        "--per-principle", type=int, dest="per_principle", metavar="N", help="requests per principle and role"
    )
    cl.add_argument("--recall", type=float, metavar="R", help="the fixed recall of the threshold (default 0.9)")
    cl.add_argument("--harmful", help="red-team prompts for the eval-set metrics")
    cl.add_argument("--benign", help="benign prompts for the eval-set metrics")
    cl.add_argument("--seed", type=int)
    cl.add_argument("--address", dest="ray_address", help="Ray cluster address (default: start local)")
    cl.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    c = sub.add_parser("constitution", help="validate, show, collect or derive constitution files")
    csub = c.add_subparsers(dest="action", required=True)
    v = csub.add_parser("validate", help="check files; exit 1 naming file, principle and field")
    v.add_argument("files", nargs="+")
    s = csub.add_parser("show", help="print a constitution's principles")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print the parsed file as JSON")
    co = csub.add_parser(
        "collect",
        help="a constitution from a public vote (Polis export): the statements every opinion group agreed with",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Collective Constitutional AI: read statements and votes in the layout of Polis's public\n"
        "data exports, find opinion groups (PCA + k-means, k by silhouette), keep the statements with\n"
        "high agreement in every group (group-aware consensus), and write them as principles with\n"
        "their provenance. The output is checked with the constitution validator before it is\n"
        "written; exit 2, nothing written, when no statement passes.",
        epilog="input (header case, spaces, a BOM and extra columns are fine):\n"
        "  --statements  comments.csv: comment-id, comment-body [, moderated: -1 = moderated out, left out]\n"
        "  --votes       votes.csv: voter-id, comment-id, vote (1 agree, -1 disagree, 0 pass) [, timestamp];\n"
        "                a re-vote replaces the earlier vote (by timestamp, else file order).\n"
        "                Or participants-votes.csv: participant, one column per comment id.\n"
        "output: FILE (a constitution; principle ids ccai-<comment-id>, weight = consensus score) and\n"
        "  FILE.rejects.jsonl (every row not used, with its reason)\n\n"
        "example:\n"
        "  cai-ray constitution collect --statements comments.csv --votes votes.csv --output constitutions/public.yaml",
    )
    co.add_argument("--statements", required=True, metavar="CSV", help="comments.csv of a Polis export")
    co.add_argument("--votes", required=True, metavar="CSV", help="votes.csv (or participants-votes.csv)")
    co.add_argument("--output", required=True, metavar="FILE", help="the constitution YAML to write")
    co.add_argument("--max-groups", type=int, default=5, metavar="K", help="most opinion groups tried (default 5)")
    co.add_argument("--min-votes", type=int, default=7, metavar="N", help="a voter's votes to be grouped (default 7)")
    co.add_argument(
        "--min-agree", type=float, default=0.6, metavar="P", help="P(agree) needed in every group (default 0.6)"
    )
    co.add_argument(
        "--min-group-votes", type=int, default=3, metavar="N", help="votes needed in every group (default 3)"
    )
    co.add_argument("--max-principles", type=int, default=20, metavar="N", help="most principles kept (default 20)")
    co.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    co.add_argument("--name", default="collective", help="constitution name (default collective)")
    co.add_argument("--version", default="1.0.0", help="constitution version (default 1.0.0)")
    co.add_argument("--description", help="constitution description (default: says how it was collected)")
    de = csub.add_parser(
        "derive",
        help="a constitution from preference pairs (Inverse Constitutional AI): the principles that reconstruct them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Inverse Constitutional AI: hold out part of the pairs, cluster the rest by the words that\n"
        "tell chosen from rejected, let the engine draft each cluster's rule as a comparison question\n"
        '("Which reply ...?"), add the measured contrasts (chosen shorter, with fewer capitals, fewer\n'
        "refusals, ... in most pairs) and the questions of --candidates, and score every candidate by how\n"
        "well the AI labeler using it alone reconstructs the held-out preferences (both orders,\n"
        "debiased; accuracy with a Wilson 95% interval). The best --k become the principles, each\n"
        "with its accuracy and where it came from. The engine runs in this process (no Ray). The\n"
        "output is checked with the constitution validator before it is written; exit 2, nothing\n"
        "written, when no candidate beats --min-accuracy.",
        epilog="input: JSONL / CSV / Parquet rows (or a label run's folder) with prompt (string) or messages,\n"
        "  chosen and rejected (strings or one assistant message each) [, id]\n"
        "--candidates: a constitution YAML (its comparison questions) or a text file, one question a line\n"
        "output: FILE (a constitution; principle ids derived-N, category derived, weight = accuracy),\n"
        "  FILE.candidates.jsonl (every candidate and draft, scored) and\n"
        "  FILE.rejects.jsonl (every row not used, with its reason)\n\n"
        "example:\n"
        "  cai-ray constitution derive --prefs prefs.jsonl --output constitutions/derived.yaml \\\n"
        "      --candidates constitutions/general.yaml --k 5",
    )
    de.add_argument("--prefs", required=True, metavar="PAIRS", help="preference pairs (file or label run folder)")
    de.add_argument("--output", required=True, metavar="FILE", help="the constitution YAML to write")
    de.add_argument(
        "--candidates", metavar="FILE", help="more candidates: a constitution YAML or a text file of questions"
    )
    de.add_argument(
        "--held-out", type=float, default=0.3, metavar="F", help="share of pairs held out for scoring (default 0.3)"
    )
    de.add_argument(
        "--clusters", type=int, default=4, metavar="N", help="clusters of training pairs drafted from (default 4)"
    )
    de.add_argument("--k", type=int, default=5, help="most principles kept (default 5)")
    de.add_argument("--examples", type=int, default=3, metavar="N", help="pairs shown per draft (default 3)")
    de.add_argument("--draft-tokens", type=int, default=32, metavar="N", help="tokens per draft (default 32)")
    de.add_argument(
        "--min-accuracy",
        type=float,
        default=0.5,
        metavar="P",
        help="a kept principle's held-out accuracy must be above this (default 0.5: chance)",
    )
    de.add_argument(
        "--min-contrast",
        type=float,
        default=0.75,
        metavar="S",
        help="a measured contrast (length, capitals, questions, lists, digits, refusals: chosen vs rejected) "
        "holding in this share of training pairs becomes a candidate and a hint to the drafts (default 0.75; "
        "above 1: off)",
    )
    de.add_argument("--backend", default="hf", help="engine backend (default hf)")
    de.add_argument("--model", default="smollm2", help="the drafting and labeling model (default smollm2)")
    de.add_argument(
        "--dtype",
        default="float32",
        help="engine dtype (default float32: a small model's labels differ by hundredths between candidates)",
    )
    de.add_argument("--seed", type=int, default=0, help="split, k-means and labeler seed (default 0)")
    de.add_argument("--name", default="derived", help="constitution name (default derived)")
    de.add_argument("--version", default="1.0.0", help="constitution version (default 1.0.0)")
    de.add_argument("--description", help="constitution description (default: says how it was derived)")
    return parser


def _train_parser(
    tsub,
    name: str,
    cls,
    help: str,
    description: str,
    data_help: str,
    data_flag: str = "--data",
    model_flag: str = "--model",
):
    p = tsub.add_parser(
        name,
        help=help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_epilog(cls),
        description=description + " Writes OUTPUT/model (a plain HF model folder), metrics.json, "
        "loss.png, rejects.jsonl and manifest.json; re-running the same command resumes from the last checkpoint.",
    )
    p.add_argument(data_flag, dest="data", help=data_help)
    p.add_argument("--output", help="output folder")
    p.add_argument("--config", help="YAML config file (see config keys below)")
    p.add_argument(
        model_flag,
        dest="model",
        help="base model (a folder written by another trainer works)"
        if model_flag == "--model"
        else "the policy to optimise (the SFT OUTPUT/model); also the reference",
    )
    p.add_argument("--workers", type=int, dest="scaling.workers", metavar="N", help="Ray Train workers")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument(
        "--lora", action="store_const", const=True, dest="lora.enabled", help="train LoRA adapters (merged on save)"
    )
    if name != "ppo":  # RL counts steps with --steps
        p.add_argument("--epochs", type=float, dest="optim.epochs", metavar="N", help="passes over the data")
        p.add_argument("--max-steps", type=int, dest="optim.max_steps", metavar="N", help="optimizer steps")
    p.add_argument("--address", dest="ray_address", help="Ray cluster address (default: start local)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


_NOT_FLAGS = (
    "command",
    "config",
    "overrides",
    "log_level",
    "actors",
    "clamp",
    "trainer",
    "redo",
    "until",
    "async_rollouts",
)


def _load(cls, args, pool_key: str):
    """Config from defaults < --config < flags < key=value; None after printing the error."""
    from cai_ray.config import ConfigError, load_config

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_FLAGS and v is not None}
    if getattr(args, "actors", None):
        flags[f"{pool_key}.min_actors"], flags[f"{pool_key}.max_actors"] = args.actors
    if getattr(args, "clamp", None):
        flags["method.clamp_low"], flags["method.clamp_high"] = args.clamp
    if getattr(args, "async_rollouts", False):
        flags["rollout.placement"], flags["ppo.mode"] = "pool", "async"
    try:
        return load_config(cls, args.config, args.overrides, flags)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _run_job(fn, cfg):
    """The job's manifest, or None after printing a user error (bad input, model, ...)."""
    from cai_ray.batch.readers import InputError
    from cai_ray.core.constitution import ConstitutionError
    from cai_ray.engine import EngineUnavailable
    from cai_ray.models import ModelNotFound

    try:
        return fn(cfg)
    except (ConstitutionError, InputError, EngineUnavailable, ModelNotFound, ValueError, OSError) as e:
        # OSError: an unreachable or forbidden object store, a full disk: the message says which
        print(f"error: {e}", file=sys.stderr)
        return None


def _print_counts(c: dict) -> None:
    print(
        f"read {c['read']} rows: written {c['written']} "
        f"({c['written_this_run']} this run, {c['already_done']} already done), "
        f"rejected {c['rejected']}"
    )


def _print_paths(out, data: str) -> None:
    print(f"output:   {data}")
    print(f"rejects:  {out / 'rejects.jsonl'}")
    print(f"manifest: {out / 'manifest.json'}")


def cmd_generate(args) -> int:
    from cai_ray.generate.config import GenerateConfig
    from cai_ray.generate.run import generate

    cfg = _load(GenerateConfig, args, "pool")
    manifest = cfg and _run_job(generate, cfg)
    if not manifest:
        return 2
    from cai_ray.batch.storage import Store

    out = Store(cfg.output)  # a folder or an object-store prefix: out / 'x' is its address
    _print_counts(manifest["counts"])
    _print_paths(out, str(out / "data"))
    return 0


def cmd_label(args) -> int:
    from cai_ray.label.config import LabelConfig
    from cai_ray.label.run import label

    cfg = _load(LabelConfig, args, "labeler_pool")
    manifest = cfg and _run_job(label, cfg)
    if not manifest:
        return 2
    from cai_ray.batch.storage import Store

    out = Store(cfg.output)  # a folder or an object-store prefix: out / 'x' is its address
    _print_counts(manifest["counts"])
    q = manifest["labels"]
    print(
        f"pairs {q['pairs']}: labels {q['labels']}, kept {q['kept']}, filtered {q['filtered'] or 0}; "
        f"invalid {q['invalid']}"
    )
    print(
        f"labeler: mean margin {_fmt(q['mean_margin'])}, position-consistent {_fmt(q['position_consistent_share'])}, "
        f"position bias (P(first shown)) {_fmt(q['position_bias'])}"
    )
    if manifest.get("labels_by_constitution"):
        print(f"{'constitution':<32}{'labels':>8}{'kept':>7}{'margin':>8}{'consistent':>11}{'bias':>7}")
        for cid, c in manifest["labels_by_constitution"].items():
            print(
                f"{cid:<32}{c['labels']:>8}{c['kept']:>7}{_fmt(c['mean_margin']):>8}"
                f"{_fmt(c['position_consistent_share']):>11}{_fmt(c['position_bias']):>7}"
            )
    if manifest.get("review"):
        r = manifest["review"]
        print(f"review queue: {r['queued']} unsure labels for people in {r['queue']} (cai-ray review {cfg.output})")
        if r.get("agreement") and r["agreement"]["kappa"] is not None:
            a = r["agreement"]
            print(
                f"AI vs people on {a['compared']} reviewed pairs: agreement {_fmt(a['agreement'])}, kappa {_fmt(a['kappa'])} {a['kappa_ci']}"
            )
    if "gold" in manifest:
        g = manifest["gold"]
        print(
            f"gold ({g['labelled']} of {g['gold_pairs']} labelled): accuracy {_fmt(g['accuracy'])}, "
            f"ECE {_fmt(g['ece'])}, reliability diagram {g['reliability_png']}"
        )
    _print_paths(out, f"{out / 'data'} (kept), {out / 'filtered'} (filtered, with filter_reason)")
    return 0


def cmd_train(args) -> int:
    from cai_ray.train import trainer

    cls, job = trainer(args.trainer)
    cfg = _load(cls, args, "")
    manifest = cfg and _run_job(job, cfg)  # bad data is a ValueError: one line, exit 2
    if not manifest:
        return 2
    from cai_ray.batch.storage import Store

    out = Store(cfg.output)  # a folder or an object-store prefix
    m, d = manifest["metrics"], manifest["data"]
    if args.trainer == "ppo" and "first" in m:
        f, last = m["first"], m["last"]
        print(f"{cfg.algo}: {m['global_step']} steps on {d['rows']} prompts (rejected {d['rejected']}: {d['rejects']})")
        print(
            f"reward {_fmt(f['reward'])} -> {_fmt(last['reward'])}, KL {_fmt(last['kl'])} (beta {_fmt(last['kl_coef'])}), "
            f"entropy {_fmt(last['entropy'])}, benign refusal rate {_fmt(f['probe_refusal_rate'])} -> "
            f"{_fmt(last['probe_refusal_rate'])}, top n-gram share {_fmt(last['top_ngram_share'])}"
        )
        print(
            f"value model: {out / 'value'}; per step: {out / 'steps.jsonl'}, {out / 'ppo.png'}, {out / 'samples.jsonl'}"
        )
    else:
        print(
            f"trained {m['global_step']} steps on {d['rows']} rows (rejected {d['rejected']}: {d['rejects']}): "
            f"final loss {_fmt(m['train_loss'])}"
        )
    if "mix" in manifest:
        x = manifest["mix"]
        print(
            f"mixed in {x['rows']} helpfulness rows from {x['path']} ({x['share']:.0%} of the set"
            f"{', file repeated' if x['repeated'] else ''})"
        )
    if m.get("eval"):
        e = m["eval"]
        print(
            f"held out {e['pairs']} pairs: accuracy {_fmt(e['accuracy'])}, ECE {_fmt(e['ece'])}, "
            f"calibration plot {e['calibration_png']}"
        )
    print(f"model:    {out / 'model'}  (use it as --model / --policy)")
    print(f"metrics:  {out / 'metrics.json'}, {out / 'loss.png'}")
    print(f"manifest: {out / 'manifest.json'}")
    return 0


def cmd_serve(args) -> int:
    from cai_ray.serve.config import ServeConfig

    cfg = _load(ServeConfig, args, "")
    if cfg is None:
        return 2
    from cai_ray.serve.deployment import start, wait_forever

    try:
        url = start(cfg)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {cfg.policy.model} at {url}  (OpenAI base_url {url}/v1; Ctrl-C stops)", flush=True)
    wait_forever()
    return 0


def cmd_review(args) -> int:
    from cai_ray.serve.review import run

    return run(args.output, args.host, args.port, args.api_key_file, args.lease_minutes, args.auth)


def cmd_eval(args) -> int:
    from cai_ray.eval.config import EvalConfig
    from cai_ray.eval.run import evaluate, headline

    cfg = _load(EvalConfig, args, "")
    manifest = cfg and _run_job(evaluate, cfg)
    if not manifest:
        return 2
    from cai_ray.batch.storage import Store

    out = Store(cfg.output)  # a folder or an object-store prefix: out / 'x' is its address
    m = manifest["metrics"]
    print(
        f"{m['prompts']['harmful']} red-team and {m['prompts']['benign']} benign prompts "
        f"(rejected {m['rejected']}: {out / 'rejects.jsonl'}); judge {m['judge']}"
    )
    print("\n".join(headline(m)))
    print(f"report:   {manifest['report']}")
    print(f"answers:  {out / 'answers.jsonl'}, {out / 'comparisons.jsonl'}")
    print(f"metrics:  {out / 'metrics.json'}")
    return 0


def cmd_classifiers(args) -> int:
    from cai_ray.classifiers.config import ClassifiersConfig
    from cai_ray.classifiers.run import headline, train_classifiers

    cfg = _load(ClassifiersConfig, args, "")
    manifest = cfg and _run_job(train_classifiers, cfg)
    if not manifest:
        return 2
    out = Path(cfg.output).resolve()
    c = manifest["counts"]
    print(
        f"{c['rows']} synthetic rows from {c['requests']} of {c['requests_asked']} requests: {c['kept']} kept, "
        f"{c['filtered']} filtered by the judge ({out / 'filtered.jsonl'}), {c['rejected']} rejected "
        f"({out / 'rejects.jsonl'})"
    )
    print("\n".join(headline(manifest)))
    print(f"guard:    {out / 'guard.json'}  (cai-ray serve --guard classifier --classifiers {out})")
    print(f"models:   {out / 'input' / 'model'}, {out / 'output' / 'model'}")
    print(f"metrics:  {out / 'metrics.json'}; rows: {out / 'data'}")
    print(f"manifest: {out / 'manifest.json'}")
    return 0


def cmd_pipeline(args) -> int:
    from cai_ray.eval.run import headline
    from cai_ray.pipeline.config import PipelineConfig
    from cai_ray.pipeline.run import run_pipeline, stage_lines

    cfg = _load(PipelineConfig, args, "")
    state = cfg and _run_job(lambda c: run_pipeline(c, redo=args.redo, until=args.until), cfg)
    if not state:
        return 2
    out = Path(cfg.output).resolve()
    print(f"\n=== cai-ray pipeline: {state['status']} ===")
    print("\n".join(stage_lines(state)))
    ev = out / "eval" / "metrics.json"
    if "eval" in state["stages"] and ev.exists():
        print("\n" + "\n".join(headline(json.loads(ev.read_text()))))
        print(f"\nreport:   {out / 'eval' / 'report.html'}")
    print(f"lineage:  {out / 'pipeline.json'}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _constitution_job(action: str, call, error_type: type[Exception]) -> int:
    """Run ``call()`` (collect or derive): its report and 0, or its ``error_type`` on stderr and 2."""
    try:
        result = call()
    except error_type as e:
        print(f"constitution {action}: {e}", file=sys.stderr)
        return 2
    print("\n".join(result.report()))
    return 0


def cmd_constitution(args) -> int:
    from cai_ray.core.constitution import ConstitutionError, load_constitution

    if args.action == "collect":
        from cai_ray.collective.collect import DEFAULT_DESCRIPTION, collect
        from cai_ray.collective.polis import CollectError

        return _constitution_job(
            "collect",
            lambda: collect(
                args.statements,
                args.votes,
                args.output,
                max_groups=args.max_groups,
                min_votes=args.min_votes,
                min_agree=args.min_agree,
                min_group_votes=args.min_group_votes,
                max_principles=args.max_principles,
                seed=args.seed,
                name=args.name,
                version=args.version,
                description=args.description or DEFAULT_DESCRIPTION,
            ),
            CollectError,
        )
    if args.action == "derive":
        from cai_ray.collective.derive import DEFAULT_DESCRIPTION, DeriveError, derive

        return _constitution_job(
            "derive",
            lambda: derive(
                args.prefs,
                args.output,
                backend=args.backend,
                model=args.model,
                dtype=args.dtype,
                candidates=args.candidates,
                held_out=args.held_out,
                clusters=args.clusters,
                k=args.k,
                examples=args.examples,
                draft_tokens=args.draft_tokens,
                min_accuracy=args.min_accuracy,
                min_contrast=args.min_contrast,
                seed=args.seed,
                name=args.name,
                version=args.version,
                description=args.description or DEFAULT_DESCRIPTION,
            ),
            DeriveError,
        )
    if args.action == "validate":
        failed = 0
        for f in args.files:
            try:
                c = load_constitution(f)
            except ConstitutionError as e:
                print(e, file=sys.stderr)
                failed += 1
            else:
                print(
                    f"{f}: ok ({c.name} {c.version}, {len(c.principles)} principles, "
                    f"{len(c.critique_examples)} critique and {len(c.comparison_examples)} "
                    f"comparison examples)"
                )
        return 1 if failed else 0
    try:
        c = load_constitution(args.file)
    except ConstitutionError as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(c.to_dict(), indent=2))
        return 0
    total = sum(p.weight for p in c.principles)
    print(f"{c.name} {c.version}  sha256:{c.sha256[:16]}  ({args.file})")
    print(c.description)
    print(f"\n{'id':<24} {'category':<18} {'weight':>6} {'P(draw)':>8}")
    for p in c.principles:
        print(f"{p.id:<24} {p.category:<18} {p.weight:>6.2f} {p.weight / total:>8.1%}")
    print(f"\nfew-shot: {len(c.critique_examples)} critique/revision, {len(c.comparison_examples)} comparison examples")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cai_ray.runtime import setup_logging

    setup_logging(args.log_level)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "label":
        return cmd_label(args)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "review":
        return cmd_review(args)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "pipeline":
        return cmd_pipeline(args)
    if args.command == "classifiers":
        return cmd_classifiers(args)
    if args.command == "constitution":
        return cmd_constitution(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
