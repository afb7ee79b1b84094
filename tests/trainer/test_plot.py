"""The run plot: metrics read from metrics.jsonl, routed to panels, drawn to a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_rl.cli import main
from megatron_rl.trainer.plot import draw, load_metrics, panels, plot_run, rolling_mean

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, num_steps: int = 6) -> Path:
    """Steps 1..num_steps; validation at steps 3 and 6; a string, a null, a list and a truncated last line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, num_steps + 1):
        record = {"step": step, "reward/mean": step / 10, "reward/format/mean": 1.0,
                  "reward/correctness/mean": -1 + step / 10, "time/step_s": 2.0 + step, "actor/kl": step / 100,
                  "actor/entropy": 3.0, "actor/grad_norm": 0.5, "response_length/mean": 10.0 * step,
                  "response_length/clip_ratio": 0.0, "note": "text", "reward/length/mean": None, "shape": [1, 2]}
        if step % 3 == 0:
            record["val/test_acc/MedIQ"] = step / 12
        lines.append(json.dumps(record))
    lines.append('{"step": 7, "reward/mean": 0.9, "val/test_acc/Med')  # a crash mid-write
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))
    return run_dir


def test_load_metrics_keeps_numbers_by_step_and_ignores_the_truncated_line(tmp_path: Path) -> None:
    metrics = load_metrics(write_run(tmp_path / "run") / "metrics.jsonl")
    assert metrics["reward/mean"] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 0.5), (6, 0.6)]
    assert metrics["val/test_acc/MedIQ"] == [(3, 0.25), (6, 0.5)]
    assert "note" not in metrics and "shape" not in metrics and "reward/length/mean" not in metrics
    assert "step" not in metrics


def test_rolling_mean_by_hand() -> None:
    # window 2: 1, (1+2)/2, (2+3)/2, (3+4)/2; window 3: 1, 1.5, 2, 3
    assert rolling_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert rolling_mean([1, 2, 3, 4], 3) == [1, 1.5, 2, 3]


def test_panels_route_each_family(tmp_path: Path) -> None:
    metrics = load_metrics(write_run(tmp_path / "run") / "metrics.jsonl")
    chosen = {panel.title: panel for panel in panels(metrics, window=2)}
    assert list(chosen) == ["reward", "reward parts", "validation accuracy", "response length (tokens)", "KL",
                            "entropy", "grad norm", "step time (s)"]
    raw, smooth = chosen["reward"].series
    assert raw.points == metrics["reward/mean"]
    assert [step for step, _ in smooth.points] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in smooth.points] == pytest.approx([0.1, 0.15, 0.25, 0.35, 0.45, 0.55])
    assert [s.label for s in chosen["reward parts"].series] == ["correctness", "format"]
    (val,) = chosen["validation accuracy"].series
    assert (val.label, val.points, val.style) == ("MedIQ", [(3, 0.25), (6, 0.5)], "points")
    assert [s.label for s in chosen["response length (tokens)"].series] == ["mean"]  # the clip ratio is no length
    assert [s.label for s in chosen["KL"].series] == ["actor/kl"]


def test_draw_gives_matplotlib_the_panel_data(tmp_path: Path) -> None:
    metrics = load_metrics(write_run(tmp_path / "run") / "metrics.jsonl")
    figure = draw(panels(metrics, window=2))
    by_title = {axes.get_title(): axes for axes in figure.axes}
    assert len(by_title) == 8
    val_line = by_title["validation accuracy"].lines[0]
    assert val_line.get_xydata().tolist() == [[3, 0.25], [6, 0.5]] and val_line.get_marker() == "o"
    assert by_title["reward"].lines[1].get_ydata() == pytest.approx([0.1, 0.15, 0.25, 0.35, 0.45, 0.55])


def test_plot_run_writes_a_png_and_the_cli_prints_its_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = write_run(tmp_path / "run")
    png = plot_run(run_dir)
    assert png == run_dir / "reward.png" and png.read_bytes()[:8] == PNG_SIGNATURE
    assert main(["plot", str(run_dir), "--output", str(tmp_path / "out" / "r.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "r.png")
    assert (tmp_path / "out" / "r.png").read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["r.png"]  # no temp file left


def test_a_run_with_only_the_required_keys_plots(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": -2.0, "time/step_s": 4.0}\n')
    assert [panel.title for panel in panels(load_metrics(tmp_path / "metrics.jsonl"))] == ["reward", "step time (s)"]
    assert plot_run(tmp_path).read_bytes()[:8] == PNG_SIGNATURE


def test_missing_metrics_file_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere" / "metrics.jsonl"
    with pytest.raises(ValueError, match=str(missing)):
        plot_run(tmp_path / "nowhere")
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert str(missing) in capsys.readouterr().err
