"""Plots shared by steps (kept out of any one step, so steps do not import each other)."""

from __future__ import annotations

from pathlib import Path


def reliability_diagram(
    probs: list[float],
    outcomes: list[float],
    path: Path,
    bins: int = 10,
    *,
    who: str = "labeler",
    what: str = "P(response_a is better)",
    items: str = "gold pairs",
) -> None:
    """Observed against predicted probability per bin, with a histogram of predictions
    (``outcomes`` may be soft: the mean target per bin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers, freq, counts = [], [], []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            centers.append(sum(probs[i] for i in idx) / len(idx))
            freq.append(sum(outcomes[i] for i in idx) / len(idx))
            counts.append(len(idx))
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centers, freq, "o-", label=who)
    ax.set_ylabel(f"observed {what}")
    ax.set_title(f"{who.capitalize()} reliability on {len(probs)} {items}")
    ax.legend(loc="upper left")
    hx.bar(
        [b / bins + 0.5 / bins for b in range(bins)],
        [sum(1 for p in probs if b / bins <= p < (b + 1) / bins or (b == bins - 1 and p == 1.0)) for b in range(bins)],
        width=0.9 / bins,
    )
    hx.set_xlabel(f"predicted {what}")
    hx.set_ylabel("count")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
