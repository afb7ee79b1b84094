"""RUN_DIR/metrics.jsonl -> RUN_DIR/reward.png: the curves of a run, one panel per family.

    megatron-rl plot RUN_DIR            # prints the PNG's path

Panels, each drawn only when the run logged its keys: the reward mean with a rolling mean,
the reward parts (``reward/<part>/mean``), training and validation accuracy per source
(validation as points at the steps where it ran), response length, KL, entropy, gradient
norm and step time. Reading and choosing the data (``load_metrics``, ``rolling_mean``,
``panels``) are pure functions; ``draw`` and ``plot_run`` only render them (matplotlib's Agg
canvas, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron_rl.trainer.metrics import METRICS_FILE, read_metrics

PLOT_FILE = "reward.png"

Points = list[tuple[int, float]]


def load_metrics(path: str | Path) -> dict[str, Points]:
    """Every numeric metric of a metrics file as ``key -> [(step, value), ...]`` in file order.

    A partly written last line is ignored (as by ``read_metrics``); values that are not
    numbers (strings, null, lists, booleans) and records without an integer ``step`` are
    skipped.

    Raises:
        ValueError: the file does not exist (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {str(path)!r} does not exist (a training run writes RUN_DIR/{METRICS_FILE})")
    series: dict[str, Points] = {}
    for record in read_metrics(path):
        step = record.get("step")
        if type(step) is not int:
            continue
        for key, value in record.items():
            if key != "step" and type(value) in (int, float) and math.isfinite(value):
                series.setdefault(key, []).append((step, float(value)))
    return series


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): [1, 2, 3, 4], 2 ->
    [1, 1.5, 2.5, 3.5]."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass(frozen=True)
class Series:
    """One curve: ``style`` is "line", "faint" (a thin line under a smoothed one) or "points"."""

    label: str
    points: Points
    style: str = "line"


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]


def _keys(metrics: dict[str, Points], keep: Callable[[str], bool]) -> list[str]:
    return sorted(key for key in metrics if keep(key))


def _named(name: str) -> Callable[[str], bool]:
    """Keys whose last part is ``name``: "kl", "actor/kl"."""
    return lambda key: key == name or key.endswith("/" + name)


def panels(metrics: dict[str, Points], *, window: int | None = None) -> list[Panel]:
    """The panels to draw, in order, each with at least one series.

    Args:
        metrics: from ``load_metrics``.
        window: steps in the reward's rolling mean; default a tenth of the steps (at least 1).
    """
    out = []
    reward = metrics.get("reward/mean")
    if reward:
        width = window or max(1, len(reward) // 10)
        smooth = list(zip([step for step, _ in reward], rolling_mean([v for _, v in reward], width)))
        out.append(Panel("reward", (Series("reward/mean", reward, "faint"),
                                    Series(f"rolling mean ({width} steps)", smooth))))
    families: list[tuple[str, Callable[[str], bool], Callable[[str], str], str]] = [
        ("reward parts", lambda k: k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean",
         lambda k: k.split("/")[1], "line"),
        ("training accuracy", lambda k: k.startswith("acc/"), lambda k: k.split("/", 1)[1], "line"),
        ("validation accuracy", lambda k: k.startswith("val/test_acc/"), lambda k: k.split("/", 2)[2], "points"),
        ("response length (tokens)", lambda k: k.startswith("response_length/") and not k.endswith("ratio"),
         lambda k: k.split("/", 1)[1], "line"),
        ("KL", _named("kl"), str, "line"),
        ("entropy", _named("entropy"), str, "line"),
        ("grad norm", _named("grad_norm"), str, "line"),
        ("step time (s)", lambda k: k == "time/step_s", str, "line"),
    ]
    for title, keep, label, style in families:
        keys = _keys(metrics, keep)
        if keys:
            out.append(Panel(title, tuple(Series(label(key), metrics[key], style) for key in keys)))
    return out


_STYLES = {"line": {"linewidth": 1.5}, "faint": {"linewidth": 0.8, "alpha": 0.4},
           "points": {"marker": "o", "linewidth": 1}}


def draw(panel_list: list[Panel], title: str = "") -> Figure:
    """A figure of two columns of panels (a figure with a note when there is nothing to draw)."""
    rows = max(1, math.ceil(len(panel_list) / 2))
    figure = Figure(figsize=(12, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title)
    if not panel_list:
        figure.text(0.5, 0.5, "no numeric metrics logged yet", ha="center", va="center")
    for i, panel in enumerate(panel_list):
        axes = figure.add_subplot(rows, 2, i + 1)
        for series in panel.series:
            steps, values = zip(*series.points)
            style = _STYLES["points"] if len(steps) == 1 else _STYLES[series.style]  # a lone point needs a marker
            axes.plot(steps, values, label=series.label, **style)
        axes.set_title(panel.title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if len(panel.series) > 1:
            axes.legend(fontsize="small")
    return figure


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl to ``out`` (default RUN_DIR/reward.png), written atomically.

    Raises:
        ValueError: RUN_DIR/metrics.jsonl does not exist.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    figure = draw(panels(load_metrics(run_dir / METRICS_FILE)), title=str(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp")
    figure.savefig(temp, format="png", dpi=100)
    temp.replace(out)
    return out
