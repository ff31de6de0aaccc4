"""`make demo`: the SL-CAI stage on the bundled red-team sample with the embedded SmolLM2.

    python jobs/demo.py [--output out/demo] [key=value ...]

Prints where the dataset is and two example traces (answer → critique → revision).
SmolLM2-135M is far too small to critique itself well: this proves the plumbing on a
laptop; point `engine.model` at a 7B+ model on GPUs for real data.
"""

import argparse
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai_ray.config import GenerateConfig, load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402


def show(title: str, text: str | None) -> None:
    body = textwrap.fill((text or "").strip() or "(empty)", width=96, initial_indent="    ",
                         subsequent_indent="    ", max_lines=8, placeholder=" [...]")
    print(f"  {title}:\n{body}")


def main() -> None:
    parser = argparse.ArgumentParser(description="SL-CAI demo on the bundled sample")
    parser.add_argument("--output", default=str(ROOT / "out" / "demo"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    setup_logging("WARNING")

    cfg = load_config(
        GenerateConfig,
        ROOT / "jobs" / "configs" / "sl_data_tiny.yaml",
        [f"input={ROOT / 'jobs' / 'data' / 'red_team.jsonl'}", f"output={args.output}", "pool.batch_size=24",
         f"constitution={ROOT / 'constitutions' / 'general.yaml'}", *args.overrides],
    )
    from cai_ray.sl import generate
    import pyarrow.parquet as pq

    manifest = generate(cfg)
    c, t = manifest["counts"], manifest["timing"]
    rows = pq.read_table(Path(cfg.output) / "data").to_pylist()
    rows.sort(key=lambda r: r["id"])
    print("\n=== cai-ray demo: SL-CAI data ===")
    print(f"model {manifest['model']['name']}, constitution {manifest['constitution']['name']} "
          f"(sha256 {manifest['constitution']['sha256'][:12]}), {cfg.revisions} revision(s)")
    print(f"read {c['read']}, written {c['written']} ({c['written_this_run']} this run), "
          f"rejected {c['rejected']}; {t['tokens_generated']} tokens in {t['wall_s']:.0f} s")
    for r in rows[:2]:
        print(f"\n[{r['id']}] prompt: {r['prompt']}")
        show("initial answer", r["init_response"])
        for i, step in enumerate(r["steps"], 1):
            show(f"critique {i} ({step['principle_id']})", step["critique"])
            show(f"revision {i}", step["revision"])
    out = Path(cfg.output)
    print(f"\ndataset:  {out / 'data'}  (datasets.load_dataset('parquet', data_files='{out}/data/*.parquet'))")
    print(f"rejects:  {out / 'rejects.jsonl'}")
    print(f"manifest: {out / 'manifest.json'}")


if __name__ == "__main__":
    main()
