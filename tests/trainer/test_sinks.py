"""The metric sinks for real: MetricsWriter's TensorBoard events read back with TensorBoard's own
reader, its W&B run (offline mode, no network) read back with W&B's own ``wandb leet inspect``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rl.trainer.metrics import MetricsWriter, read_metrics

STEPS = {1: {"reward/mean": 0.5, "actor/loss": 1.25}, 2: {"reward/mean": 0.75, "actor/loss": float("nan")}}


def _log_steps(writer: MetricsWriter) -> None:
    for step, metrics in STEPS.items():
        writer.log(step, metrics)
    writer.close()


def test_tensorboard_events_read_back_with_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a dev requirement (requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_steps(MetricsWriter(tmp_path, tensorboard=True))
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["actor/loss", "reward/mean"]
    assert [(e.step, e.value) for e in accumulator.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]
    loss = accumulator.Scalars("actor/loss")
    assert loss[0].value == 1.25 and math.isnan(loss[1].value)  # TensorBoard keeps the NaN
    assert [r["reward/mean"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.5, 0.75]  # jsonl as ever


def _wandb_inspect(run_dir: Path, *flags: str) -> str:
    wandb_cli = Path(sys.executable).with_name("wandb")
    command = [str(wandb_cli)] if wandb_cli.exists() else [shutil.which("wandb") or "wandb"]
    done = subprocess.run([*command, "leet", "inspect", *flags, str(run_dir)], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout


def test_wandb_offline_run_read_back_with_wandbs_reader(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is a dev requirement (requirements-dev.txt)")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                        "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    run_dir = tmp_path / "run"
    _log_steps(MetricsWriter(run_dir, wandb_project="megatron-rl-test", config={"algorithm": {"kl_coef": 0.0}}))
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline run in RUN_DIR/wandb"

    summary = json.loads(_wandb_inspect(runs[0], "--summary", "--json"))
    assert summary["project"] == "megatron-rl-test"
    assert summary["name"] == "run"  # the run directory's name
    assert summary["state"] == "finished" and summary["step"] == 2
    assert summary["config"]["algorithm"] == {"kl_coef": 0.0}
    assert summary["summary"]["reward/mean"] == 0.75

    records = [json.loads(line) for line in _wandb_inspect(runs[0], "--json").splitlines() if line.strip()]
    history = [r["history"] for r in records if r.get("type") == "history"]
    assert [h["step"]["num"] for h in history] == [1, 2]
    assert [h["item"]["reward/mean"] for h in history] == [0.5, 0.75]
    assert history[0]["item"]["actor/loss"] == 1.25 and history[1]["item"]["actor/loss"] == "NaN"
