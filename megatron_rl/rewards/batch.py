"""Scoring many responses at once, in a process pool when the batch is large."""

from __future__ import annotations

import atexit
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor

from megatron_rl.rewards.config import DEFAULT_CONFIG, RewardConfig
from megatron_rl.rewards.score import NO_LENGTH_CONTROL, RewardResult, score, task_of

PARALLEL_MIN_ROWS = 4096
"""Below this many rows, ``score_batch`` scores in-process: a pool costs more than it saves."""

_CHUNK_ROWS = 512
_REQUIRED_KEYS = ("data_source", "ground_truth")
_pools: dict[int, ProcessPoolExecutor] = {}


def score_batch(
    rows: Sequence[Mapping[str, object]],
    *,
    config: RewardConfig = DEFAULT_CONFIG,
    num_workers: int | None = None,
) -> list[RewardResult]:
    """Score each row; results are in row order.

    Each row holds ``data_source``, ``response``, ``ground_truth`` and optionally
    ``lower_limit``, ``upper_limit``, ``num_tokens`` and ``response_num_tokens`` (the keyword
    arguments of ``score``). Every row is checked before any is scored, so a bad data_source or
    a missing key fails the whole call at once with the row's index, never halfway.

    num_workers: processes to use; None picks 1 below ``PARALLEL_MIN_ROWS`` rows and one per
    CPU core (at most 8) above.
    """
    for index, row in enumerate(rows):
        _check_row(index, row)
    if num_workers is None:
        num_workers = 1 if len(rows) < PARALLEL_MIN_ROWS else min(8, os.cpu_count() or 1)
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 1")
    if num_workers == 1 or len(rows) <= _CHUNK_ROWS:
        return _score_rows(rows, config)
    chunks = [list(rows[i : i + _CHUNK_ROWS]) for i in range(0, len(rows), _CHUNK_ROWS)]
    results: list[RewardResult] = []
    for part in _pool(num_workers).map(_score_rows, chunks, [config] * len(chunks)):
        results.extend(part)
    return results


def _check_row(index: int, row: Mapping[str, object]) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index}: expected a mapping of fields, got {type(row).__name__}")
    for key in _REQUIRED_KEYS:
        if key not in row:
            raise ValueError(f"row {index}: missing field {key!r}")
    try:
        task_of(row["data_source"])  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"row {index}: {err}") from None
    num_tokens = row.get("num_tokens")
    if num_tokens is not None and num_tokens != NO_LENGTH_CONTROL and row.get("response_num_tokens") is None:
        raise ValueError(f"row {index}: response_num_tokens is required when num_tokens={num_tokens}")


def _score_rows(rows: Sequence[Mapping[str, object]], config: RewardConfig) -> list[RewardResult]:
    return [
        score(
            row["data_source"],  # type: ignore[arg-type]
            row.get("response"),
            row["ground_truth"],
            lower_limit=row.get("lower_limit"),
            upper_limit=row.get("upper_limit"),
            num_tokens=row.get("num_tokens", NO_LENGTH_CONTROL),  # type: ignore[arg-type]
            response_num_tokens=row.get("response_num_tokens"),  # type: ignore[arg-type]
            config=config,
        )
        for row in rows
    ]


def _pool(num_workers: int) -> ProcessPoolExecutor:
    """A pool kept for the life of the process (workers start once, not every step)."""
    if num_workers not in _pools:
        # forkserver: forking a trainer process that holds torch/NCCL threads is unsafe.
        context = multiprocessing.get_context("forkserver")
        _pools[num_workers] = ProcessPoolExecutor(num_workers, mp_context=context)
    return _pools[num_workers]


@atexit.register
def _shutdown_pools() -> None:
    for pool in _pools.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _pools.clear()
