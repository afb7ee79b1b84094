"""Where step metrics go: RUN_DIR/metrics.jsonl always, TensorBoard and W&B when configured.

``metrics.jsonl`` holds one JSON object per step (``step``, ``reward/mean``, ``time/step_s``, ...),
written by the run's rank 0 and flushed to disk after every line. On resume from the checkpoint
of step ``k`` the lines of later steps (logged after that checkpoint, before the crash) are
dropped, so the file again describes exactly the steps the weights went through.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megatron_rl.jsonl import append_records, rewrite_records

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"  # rollout-only mode's responses, one line per response
GENERATIONS_FILE = "generations.jsonl"  # trainer.log_generations responses of each step, one line per response

__all__ = ["GENERATIONS_FILE", "METRICS_FILE", "ROLLOUTS_FILE", "MetricsWriter", "PhaseTimer", "read_metrics",
           "truncate_step_records"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a partly written last line (a crash mid-write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def truncate_step_records(path: str | Path, last_step: int) -> int:
    """Rewrite a JSON-lines file of ``step`` records (metrics.jsonl, rollouts.jsonl) atomically, keeping
    the records of steps <= ``last_step`` and dropping a partly written last line; return how many
    records were dropped. A missing file is left missing."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= last_step]
    rewrite_records(path, kept)
    return len(records) - len(kept)


def _jsonable(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN/Inf


class MetricsWriter:
    """Appends step records to metrics.jsonl and mirrors them to the configured sinks."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, wandb_project: str = "",
                 config: Mapping[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._tensorboard = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError(f"trainer.tensorboard=true needs the tensorboard package ({err}); "
                                 "pip install tensorboard") from err
            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError(f"trainer.wandb_project={wandb_project!r} needs the wandb package ({err}); "
                                 "pip install wandb") from err
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=dict(config or {}),
                                     name=Path(run_dir).name, resume="allow")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        append_records(self.path, [{"step": step, **{k: _jsonable(float(v)) for k, v in sorted(metrics.items())}}])
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


class PhaseTimer:
    """Wall time per phase of a step: ``with timer("generate"): ...`` adds to ``time/generate_s``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
