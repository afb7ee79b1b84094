"""Accuracy and response length against the length budget, one line per benchmark (a PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_budgets(rows: Sequence[Mapping[str, object]], path: Path, *, length_mode: str) -> None:
    """Two panels from :func:`megatron_rl.evaluation.metrics.summarize` rows: accuracy vs budget and
    mean length vs budget (with the line length = budget). A row without a budget (no length
    instruction) is drawn as a dashed horizontal line. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, len_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    sources = sorted({str(r["data_source"]) for r in rows})
    budgets = sorted({int(r["budget"]) for r in rows if r["budget"] is not None})
    for color, source in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, sources):
        mine = [r for r in rows if r["data_source"] == source]
        with_budget = sorted((r for r in mine if r["budget"] is not None), key=lambda r: int(r["budget"]))
        xs = [int(r["budget"]) for r in with_budget]
        acc_ax.plot(xs, [r["accuracy"] for r in with_budget], "o-", color=color, label=source)
        len_ax.plot(xs, [r["mean_length"] for r in with_budget], "o-", color=color, label=source)
        for r in mine:
            if r["budget"] is None:
                acc_ax.axhline(r["accuracy"], color=color, linestyle="--", linewidth=1)
                len_ax.axhline(r["mean_length"], color=color, linestyle="--", linewidth=1)
    if budgets:
        len_ax.plot(budgets, budgets, ":", color="gray", label="length = budget")
    for ax, label in ((acc_ax, "accuracy"), (len_ax, "mean response length (tokens)")):
        ax.set_xlabel(f"length budget ({length_mode}; dashed: no instruction)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(-0.02, 1.02)
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    temp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(temp, dpi=100)
    plt.close(fig)
    temp.replace(path)
