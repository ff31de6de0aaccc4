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


def build_parser() -> argparse.ArgumentParser:
    from cai_ray.config import GenerateConfig

    parser = argparse.ArgumentParser(
        prog="cai-ray", description="Constitutional AI at cluster scale on Ray."
    )
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
    g.add_argument("--input", help="prompt file or folder")
    g.add_argument("--output", help="output folder")
    g.add_argument("--config", help="YAML config file (see config keys below)")
    g.add_argument("--constitution", help="constitution YAML")
    g.add_argument("--model", dest="engine.model", metavar="MODEL", help="smollm2 | tiny-random | model folder")
    g.add_argument("--engine", dest="engine.backend", choices=["hf", "vllm"], help="engine backend")
    g.add_argument("--revisions", type=int, metavar="N", help="critique/revision rounds")
    g.add_argument("--direct", action="store_const", const=False, dest="critique",
                   help="direct revision without a critique")
    g.add_argument("--max-new-tokens", type=int, dest="sampling.max_new_tokens", metavar="N",
                   help="token budget per answer, critique and revision")
    g.add_argument("--actors", type=_actors, metavar="MIN,MAX", help="engine actor pool size: MIN,MAX (or N)")
    g.add_argument("--batch-size", type=int, dest="pool.batch_size", metavar="N", help="rows per engine call")
    g.add_argument("--seed", type=int)
    g.add_argument("--address", dest="ray_address", help="Ray cluster address (default: start local)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    c = sub.add_parser("constitution", help="validate or show constitution files")
    csub = c.add_subparsers(dest="action", required=True)
    v = csub.add_parser("validate", help="check files; exit 1 naming file, principle and field")
    v.add_argument("files", nargs="+")
    s = csub.add_parser("show", help="print a constitution's principles")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print the parsed file as JSON")
    return parser


def cmd_generate(args) -> int:
    from cai_ray.config import ConfigError, GenerateConfig, load_config

    flags = {
        k: v for k, v in vars(args).items()
        if k not in ("command", "config", "overrides", "log_level", "actors") and v is not None
    }
    if args.actors:
        flags["pool.min_actors"], flags["pool.max_actors"] = args.actors
    try:
        cfg = load_config(GenerateConfig, args.config, args.overrides, flags)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from cai_ray.constitution import ConstitutionError
    from cai_ray.datasets import InputError
    from cai_ray.engine import EngineUnavailable
    from cai_ray.models import ModelNotFound
    from cai_ray.sl import generate

    try:
        manifest = generate(cfg)
    except (ConstitutionError, InputError, EngineUnavailable, ModelNotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    out = Path(cfg.output)
    print(
        f"read {c['read']} rows: written {c['written']} "
        f"({c['written_this_run']} this run, {c['already_done']} already done), "
        f"rejected {c['rejected']}"
    )
    print(f"output:   {out / 'data'}")
    print(f"rejects:  {out / 'rejects.jsonl'}")
    print(f"manifest: {out / 'manifest.json'}")
    return 0


def cmd_constitution(args) -> int:
    from cai_ray.constitution import ConstitutionError, load_constitution

    if args.action == "validate":
        failed = 0
        for f in args.files:
            try:
                c = load_constitution(f)
            except ConstitutionError as e:
                print(e, file=sys.stderr)
                failed += 1
            else:
                print(f"{f}: ok ({c.name} {c.version}, {len(c.principles)} principles, "
                      f"{len(c.critique_examples)} critique and {len(c.comparison_examples)} "
                      f"comparison examples)")
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
    print(f"\nfew-shot: {len(c.critique_examples)} critique/revision, "
          f"{len(c.comparison_examples)} comparison examples")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cai_ray.runtime import setup_logging

    setup_logging(args.log_level)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "constitution":
        return cmd_constitution(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
