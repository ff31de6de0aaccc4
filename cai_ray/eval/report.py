"""The evaluation report: report.html with PNG plots, readable offline from the output folder.

pareto.png      helpfulness Elo vs harmlessness Elo per model (the CAI paper's view: up and
                to the right is better; a run that only learned to refuse moves right and down)
categories.png  attack success rate per red-team category and model
refusals.png    benign-prompt refusal rate per model: the judge and the lexical detector
principles.png  heatmap of violation rates, principle × model (red-team answers; the probe
                prompts beside it when the constitution has them), with per_principle on
report.html     the headline table, the plots, and example answers side by side with their scores
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

EXAMPLES_PER_SET = 4


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(ci, pct: bool = True) -> str:
    """A 95% interval, small, after its number."""
    if not ci:
        return ""
    fmt = _pct if pct else _num
    return f" <span class=ci>[{fmt(ci[0])}–{fmt(ci[1])}]</span>"


def _delta(d) -> str:
    """A paired difference to the baseline: points, interval, and p or n.s."""
    if not d or d.get("diff") is None:
        return "—"
    lo, hi = d["ci"]
    sig = f"p={d['p_value']:.2g}" if d["significant"] else "<b class=ns>n.s.</b>"
    return f"{d['diff'] * 100:+.0f} pts <span class=ci>[{lo * 100:+.0f}, {hi * 100:+.0f}]</span> {sig}"


def _err(value, ci) -> tuple[float, float]:
    """matplotlib's (below, above) error lengths from an interval (0 when there is none)."""
    if value is None or not ci:
        return 0.0, 0.0
    return max(0.0, value - ci[0]), max(0.0, ci[1] - value)


def _plots(out: Path, metrics: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["models"])
    ms = metrics["models"]
    files = {}

    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [ms[n]["elo"]["harmlessness"] for n in names]
    ys = [ms[n]["elo"]["helpfulness"] for n in names]
    ax.plot(xs, ys, "-", color="0.75", zorder=1)
    for n, x, y in zip(names, xs, ys):
        e = ms[n]["elo"]
        xe, ye = _err(x, e.get("harmlessness_ci")), _err(y, e.get("helpfulness_ci"))
        ax.errorbar([x], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt="o", ms=7, capsize=3, zorder=2)
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("harmlessness Elo")
    ax.set_ylabel("helpfulness Elo")
    ax.set_title(f"harmlessness vs helpfulness (baseline {metrics['baseline']} = 1000; 95% intervals)")
    ax.margins(0.25)
    ax.grid(alpha=0.3)
    _save(fig, out / "pareto.png")
    files["pareto"] = "pareto.png"

    cats = sorted({c for n in names for c in ms[n]["harmlessness"]["by_category"]})
    by_cat = {n: [ms[n]["harmlessness"]["by_category"].get(c) or {} for c in cats] for n in names}
    _grouped_bars(
        out / "categories.png",
        cats,
        {n: [x.get("attack_success_rate") or 0.0 for x in by_cat[n]] for n in names},
        {n: [_err(x.get("attack_success_rate"), x.get("attack_success_rate_ci")) for x in by_cat[n]] for n in names},
        "attack success rate",
        "red-team prompts judged harmful, by category",
        width=max(6, 0.9 * len(cats) * max(1, len(names)) / 2 + 2),
        rotate=True,
    )
    files["categories"] = "categories.png"
    _grouped_bars(
        out / "refusals.png",
        names,
        {
            label: [ms[n]["over_refusal"][key] or 0.0 for n in names]
            for key, label in (("judge_refusal_rate", "judge"), ("lexical_refusal_rate", "lexical"))
        },
        {
            label: [_err(ms[n]["over_refusal"][key], ms[n]["over_refusal"].get(f"{key}_ci")) for n in names]
            for key, label in (("judge_refusal_rate", "judge"), ("lexical_refusal_rate", "lexical"))
        },
        "refusal rate",
        "refusals of benign prompts (over-refusal)",
        width=6,
    )
    files["refusals"] = "refusals.png"
    if metrics.get("by_principle"):
        _heatmap(out / "principles.png", metrics["by_principle"], names)
        files["principles"] = "principles.png"
    return files


def _heatmap(path: Path, table: dict[str, Any], names: list[str]) -> None:
    """Violation rate per principle (rows) and model (columns), each cell "rate [lo, hi]";
    a second panel for the probe prompts when any principle has them (grey: no probes)."""
    import matplotlib.pyplot as plt
    import numpy as np

    pids = list(table)
    panels = [("violation_rate", "red-team answers")]
    if any(row["probes"] for row in table.values()):
        panels.append(("probe_violation_rate", "probe prompts"))
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(2.5 + 1.6 * len(names) * len(panels), 1.2 + 0.42 * len(pids)),
        squeeze=False,
    )
    cmap = plt.get_cmap("Reds").with_extremes(bad="0.9")  # grey: no probes for that principle
    for ax, (key, title) in zip(axes[0], panels):
        cells = [[table[p]["models"][n] for n in names] for p in pids]
        grid = np.array([[np.nan if c[key] is None else c[key] for c in row] for row in cells], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                ci = c.get(f"{key}_ci")
                if c[key] is None:
                    text = "no probes" if key == "probe_violation_rate" and not c["probe_n"] else "n/a"
                else:
                    text = f"{c[key]:.0%}" + (f"\n[{ci[0]:.0%}, {ci[1]:.0%}]" if ci else "")
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=7, color="white" if (c[key] or 0) > 0.6 else "black"
                )
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(pids)), pids if ax is axes[0][0] else [""] * len(pids))
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04, label="violation rate")
    fig.suptitle("share of answers judged to violate each principle (95% intervals)", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _grouped_bars(
    path: Path,
    groups: list[str],
    series: dict[str, list[float]],
    errors: dict[str, list[tuple[float, float]]],
    ylabel: str,
    title: str,
    width: float,
    rotate: bool = False,
) -> None:
    """One bar per series in each group (rates in [0, 1]), with its 95% interval."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, 4 if rotate else 3.5))
    bar = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series.items()):
        below, above = zip(*errors[label]) if errors[label] else ((), ())
        ax.bar(
            [j + i * bar for j in range(len(groups))],
            vals,
            bar,
            label=label,
            yerr=[list(below), list(above)] if vals else None,
            capsize=3,
        )
    ticks = [j + bar * (len(series) - 1) / 2 for j in range(len(groups))]
    if rotate:
        ax.set_xticks(ticks, groups, rotation=30, ha="right")
    else:
        ax.set_xticks(ticks, groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _examples(records: list[dict], names: list[str], set_name: str, score_key: str, score_label: str) -> str:
    by = {(r["model"], r["id"]): r for r in records if r["set"] == set_name}
    ids = list(dict.fromkeys(r["id"] for r in records if r["set"] == set_name))[:EXAMPLES_PER_SET]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for pid in ids:
        first = by[(names[0], pid)]
        prompt = html.escape(first["prompt"][-1]["content"])
        cells = []
        for n in names:
            r = by[(n, pid)]
            flag = " · lexical refusal" if r["lexical_refusal"] else ""
            cells.append(
                f"<td><div class=score>{score_label} {_num(r.get(score_key), 2)}{flag}</div>"
                f"<pre>{html.escape(r['answer'] if r['answer'] is not None else '(no answer: ' + r['invalid'] + ')')}</pre></td>"
            )
        rows.append(
            f"<tr><td class=prompt><b>{html.escape(pid)}</b> <i>{html.escape(first['category'])}</i>"
            f"<pre>{prompt}</pre></td>{''.join(cells)}</tr>"
        )
    return f"<table class=examples><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"


def _disagreements(records: list[dict], metrics: dict[str, Any], limit: int = 12) -> str:
    """The benign answers where the judge and the lexical detector disagree, with kappa."""
    by = {(r["model"], r["id"]): r for r in records if r["set"] == "benign"}
    rows, summary = [], []
    for name, m in metrics["models"].items():
        o = m["over_refusal"]
        k, kci = o.get("judge_lexical_kappa"), o.get("judge_lexical_kappa_ci")
        summary.append(
            f"{html.escape(name)}: kappa {_num(k, 2)}{_kappa_ci(kci) if kci else ''}, "
            f"{len(o.get('disagreements') or [])} disagreements"
        )
        for d in (o.get("disagreements") or [])[:limit]:
            r = by.get((name, d["id"]))
            if r is None:
                continue
            verdict = "lexical: refusal, judge: not" if d["lexical_refusal"] else "judge: refusal, lexical: not"
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td><b>{html.escape(d['id'])}</b><pre>"
                f"{html.escape(r['prompt'][-1]['content'])}</pre></td><td>{verdict} (P(refuses) {_num(d['p_refusal'], 2)})"
                f"</td><td><pre>{html.escape(r['answer'])}</pre></td></tr>"
            )
    table = (
        "<table class=examples id=disagreements><tr><th>model</th><th>prompt</th><th>detectors</th><th>answer</th></tr>"
        + "".join(rows)
        + "</table>"
        if rows
        else "<p class=note>The two detectors agree on every benign answer.</p>"
    )
    return f"<p class=note>{'; '.join(summary)}.</p>{table}"


def _principles(metrics: dict[str, Any], names: list[str], image: str | None) -> str:
    """The principle × model table: "rate [lo–hi]" per cell, the probe prompts' rate beside it."""
    table = metrics.get("by_principle")
    if not table:
        return "<p class=note>Off (<code>per_principle: false</code>): each answer was judged by its <code>judge_principles</code> only.</p>"
    probes = any(row["probes"] for row in table.values())
    head = "".join(
        f"<th>{html.escape(n)}</th>" + (f"<th>{html.escape(n)}: probes</th>" if probes else "") for n in names
    )
    rows = []
    for pid, row in table.items():
        cells = []
        for n in names:
            c = row["models"][n]
            cells.append(f"<td class=rate>{_pct(c['violation_rate'])}{_ci(c.get('violation_rate_ci'))}</td>")
            if probes:
                cells.append(
                    f"<td class=probe>{_pct(c['probe_violation_rate'])}{_ci(c.get('probe_violation_rate_ci'))}"
                    f" <span class=ci>n={c['probe_n']}</span></td>"
                    if c["probe_n"]
                    else "<td class=probe>—</td>"
                )
        rows.append(
            f"<tr class=principle data-principle='{html.escape(pid)}'><td>{html.escape(pid)}</td>"
            f"<td>{html.escape(row['category'])}</td>{''.join(cells)}</tr>"
        )
    first = next(iter(table.values()))["models"][names[0]]
    img = f'<div class=plots><img src="{image}" alt="violation rate by principle and model"></div>' if image else ""
    return (
        f"<table id=principles><tr><th>principle</th><th>category</th>{head}</tr>{''.join(rows)}</table>"
        f"<p class=note>Share of each model's {first['n']} red-team answers the judge finds in violation of the "
        "principle (the attack-success question with that one principle, both option orders, P &gt; 0.5), 95% "
        "bootstrap interval over prompts"
        + (
            "; probes: the same over the answers to that principle's probe prompts (the constitution's "
            "<code>probes</code>), judged against that principle only"
            if probes
            else ""
        )
        + f".</p>{img}"
    )


def _constitutions(metrics: dict[str, Any], names: list[str]) -> str:
    """Several constitutions in one run: each one's red-team rows side by side (attack success
    rate per model, with its interval), and the rows that picked it."""
    table = metrics.get("by_constitution")
    if not table:
        return ""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for cid, c in table.items():
        cells = "".join(
            f"<td class=rate>{_pct(c['models'][n]['attack_success_rate'])}"
            f"{_ci(c['models'][n].get('attack_success_rate_ci'))} <span class=ci>n={c['models'][n]['n']}</span></td>"
            for n in names
        )
        values = ", ".join(c["values"]) if c["values"] else "(the default)"
        rows.append(
            f"<tr class=constitution data-constitution='{html.escape(cid)}'><td>{html.escape(c['name'])}</td>"
            f"<td class=path>{html.escape(cid)}</td><td>{html.escape(values)}</td><td>{c['prompts']}</td>{cells}</tr>"
        )
    return (
        "<h2>Constitutions side by side</h2>"
        f"<table id=constitutions><tr><th>constitution</th><th>id</th><th>rows with</th><th>prompts</th>{head}</tr>"
        f"{''.join(rows)}</table><p class=note>Attack success rate over the red-team prompts each constitution "
        "judged (the rows' field picks it), 95% bootstrap interval over prompts; each constitution's own "
        "principle table is in metrics.json (<code>by_constitution</code>). The table above covers the default "
        "constitution's rows.</p>"
    )


def _kappa_ci(ci) -> str:
    return f" <span class=ci>[{ci[0]:.2f}–{ci[1]:.2f}]</span>"


def write_report(out: Path, metrics: dict[str, Any], records: list[dict], manifest: dict[str, Any]) -> Path:
    """report.html and its PNGs in ``out``; returns the HTML's path."""
    files = _plots(out, metrics)
    names = list(metrics["models"])
    ms = metrics["models"]
    rows = []
    for n in names:
        m = ms[n]
        h, o, w, e = m["harmlessness"], m["over_refusal"], m["helpfulness"], m["elo"]
        vs = m.get("vs_baseline") or {}
        rows.append(
            f"<tr class=model data-model='{html.escape(n)}'><td>{html.escape(n)}</td><td class=path>{html.escape(m['model'])}</td>"
            f"<td class=asr>{_pct(h['attack_success_rate'])}{_ci(h.get('attack_success_rate_ci'))}</td>"
            f"<td class=vs>{_delta(vs.get('attack_success_rate'))}</td><td>{_num(h['mean_p_harmful'], 2)}</td>"
            f"<td class=refusal>{_pct(o['judge_refusal_rate'])}{_ci(o.get('judge_refusal_rate_ci'))}</td>"
            f"<td class=vs>{_delta(vs.get('judge_refusal_rate'))}</td>"
            f"<td>{_pct(o['lexical_refusal_rate'])}{_ci(o.get('lexical_refusal_rate_ci'))}</td>"
            f"<td>{_pct(o['judge_lexical_agreement'])}</td>"
            f"<td class=winrate>{_pct(w['win_rate_vs_baseline'])}{_ci(w.get('win_rate_ci'))}</td>"
            f"<td class=elo-help>{_num(e['helpfulness'])}{_ci(e.get('helpfulness_ci'), False)}</td>"
            f"<td class=elo-harm>{_num(e['harmlessness'])}{_ci(e.get('harmlessness_ci'), False)}</td></tr>"
        )
    comps = metrics["comparisons"]
    c = manifest["constitution"]
    page = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>cai-ray evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1300px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
th {{ background: #f3f3f3; }}
.path {{ font-family: monospace; font-size: 85%; color: #555; }}
.examples pre {{ white-space: pre-wrap; max-width: 360px; max-height: 240px; overflow: auto; margin: 0; font-size: 85%; }}
.score {{ font-size: 80%; color: #666; margin-bottom: 4px; }}
.plots img {{ margin: 0 1em 1em 0; border: 1px solid #ddd; }}
.note {{ color: #555; font-size: 90%; }}
.ci {{ color: #777; font-size: 80%; white-space: nowrap; }}
.ns {{ color: #a60; }}
</style></head><body>
<h1>cai-ray evaluation</h1>
<p class=note>{metrics["prompts"]["harmful"]} red-team and {metrics["prompts"]["benign"]} benign prompts
({metrics["rejected"]} input rows not evaluated: malformed, too long or over the limit; see rejects.jsonl) · judge <code>{html.escape(str(metrics["judge"]))}</code> ·
constitution <code>{html.escape(c["name"])}</code> (sha256 {c["sha256"][:12]}) · baseline <b>{html.escape(metrics["baseline"])}</b></p>
<h2>Headline</h2>
<table id=headline><tr><th>model</th><th>weights</th><th>attack success rate</th><th>vs {html.escape(metrics["baseline"])}</th><th>mean P(harmful)</th>
<th>benign refusals (judge)</th><th>vs {html.escape(metrics["baseline"])}</th><th>benign refusals (lexical)</th><th>judge/lexical agreement</th>
<th>helpfulness win-rate vs {html.escape(metrics["baseline"])}</th><th>helpfulness Elo</th><th>harmlessness Elo</th></tr>
{"".join(rows)}</table>
<p class=note>Attack success rate: share of red-team answers the judge finds harmful (P &gt; 0.5) under the
constitution's principles, each asked in both option orders. Win-rate: mean debiased P(better than the baseline)
on benign prompts, every pair judged in both orders ({_pct(comps["helpfulness"]["position_consistent_share"])} of
helpfulness and {_pct(comps["harmlessness"]["position_consistent_share"])} of harmlessness comparisons agreed across
orders). Elo: Bradley–Terry fit to all pairwise games, baseline pinned at 1000. [brackets]: 95% intervals,
bootstrap over prompts; "vs" columns: the paired difference to the baseline on the same prompts, in points,
with its interval and p-value — <b>n.s.</b> unless the interval excludes zero and p &lt; 0.05 (not a real difference at this size).</p>
<h2>Plots</h2>
<div class=plots>
<img src="{files["pareto"]}" alt="harmlessness vs helpfulness Elo">
<img src="{files["categories"]}" alt="attack success rate by category">
<img src="{files["refusals"]}" alt="benign refusal rates">
</div>
<h2>Violations by principle</h2>
{_principles(metrics, names, files.get("principles"))}
{_constitutions(metrics, names)}
<h2>Refusal detectors: where the judge and the lexical detector disagree</h2>
{_disagreements(records, metrics)}
<h2>Example answers: red-team prompts</h2>
{_examples(records, names, "harmful", "p_harmful", "P(harmful)")}
<h2>Example answers: benign prompts</h2>
{_examples(records, names, "benign", "p_refusal", "P(refuses)")}
<p class=note>Every answer and score: answers.jsonl; every pairwise judgement (both orders): comparisons.jsonl;
all numbers: metrics.json; what produced them: manifest.json.</p>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def screenshot(report: Path, png: Path, chromium: str = "/usr/bin/chromium", width: int = 1300) -> dict[str, Any]:
    """Open ``report`` in headless Chromium (driven by Playwright, the system browser: no
    download), save a full-page screenshot to ``png``, and return what the page shows: each
    image's decoded width (0 = broken), the headline table's cells per model and the principle
    table's cells per principle."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise RuntimeError("screenshots need playwright: pip install 'cai-ray[test]' (and Debian's chromium)") from e
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(Path(report).resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete ? i.naturalWidth : 0])"
            )
            rows = page.evaluate(
                "Object.fromEntries(Array.from(document.querySelectorAll('#headline tr.model')).map(tr => ["
                "tr.dataset.model, Object.fromEntries(Array.from(tr.cells).filter(c => c.className)"
                ".map(c => [c.className, c.innerText.trim()]))]))"
            )
            principles = page.evaluate(
                "Object.fromEntries(Array.from(document.querySelectorAll('#principles tr.principle')).map(tr => ["
                "tr.dataset.principle, Array.from(tr.cells).slice(2).map(c => c.innerText.trim())]))"
            )
            text = page.inner_text("body")
            page.screenshot(path=str(png), full_page=True)
        finally:
            browser.close()
    return {"images": dict(images), "rows": rows, "principles": principles, "text": text}
