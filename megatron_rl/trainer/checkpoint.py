"""Run checkpoints: written whole or not at all, the newest K kept, resume from the newest good one.

Layout::

    RUN_DIR/checkpoints/step_00000012/     a complete checkpoint (Megatron distributed checkpoint of
        trainer_state.json                  model + optimizer + RNG, plus the loop's own state:
        ...                                 step, data sampler, counters)
    RUN_DIR/checkpoints/.tmp-step_00000015/ being written (a crash leaves it; it is deleted and ignored)

Every rank writes its shards into the temporary directory; once all have finished, rank 0 writes
``trainer_state.json``, syncs the files and renames the directory into place. A rename within one
file system is atomic, so a kill at any moment leaves either the new checkpoint complete or no
trace of it, and the previous complete one untouched.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rl.megatron.parallel import barrier

__all__ = ["CheckpointManager", "TrainerState"]

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FULL_DISK_BYTES = 64 * 2**20  # less free space than this when a save fails: report the disk as full
FILES_KEY = "files"  # in STATE_FILE: every other file of the checkpoint and its size in bytes
_STEP_DIR = re.compile(r"^step_(\d{8})$")
TrainerState = dict[str, Any]


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves and finds the checkpoints of one run directory (every rank creates one)."""

    def __init__(self, run_dir: str | Path, *, keep_last: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def remove_partial(self) -> list[Path]:
        """Delete the temporary directories of interrupted saves (rank 0); return them."""
        if self.rank != 0 or not self.root.is_dir():
            return []
        partial = [p for p in self.root.iterdir() if p.name.startswith(".tmp-")]
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        return partial

    def save(self, step: int, state: TrainerState, *, write_shards, write_extra=None, before_rename=None) -> Path:
        """Write checkpoint ``step``: ``write_shards(tmp_dir)`` runs on every rank (collective), then
        rank 0 runs ``write_extra(tmp_dir)``, adds ``state``, syncs the files, runs ``before_rename()``
        and renames the directory into place. Returns the final directory.

        ``before_rename`` is for what must be on disk whenever the checkpoint is: the loop appends
        the step's metrics line there. A kill before the rename leaves the line without the
        checkpoint (the resume drops it and runs the step again); after it, both are there."""
        final = self.step_dir(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            write_shards(tmp)
            barrier()
            if self.rank == 0:
                if write_extra is not None:
                    write_extra(tmp)
                files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state, FILES_KEY: files}, indent=1,
                                                         sort_keys=True))
                _fsync_tree(tmp)
        except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
            raise self._save_failed(step, tmp, err) from err
        if self.rank == 0:
            if before_rename is not None:
                before_rename()
            self._publish(tmp, final)
            for _, old in self.complete()[: -self.keep_last]:
                self._discard(old)
        barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished ``tmp`` to ``final`` (atomic): from here on the checkpoint counts."""
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            self._discard(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)

    def _save_failed(self, step: int, tmp: Path, err: Exception) -> OSError:
        """The error of a save that failed part-way (disk full, quota, I/O error): the partial directory
        is deleted (freeing its space) and the message says what survives."""
        free = shutil.disk_usage(self.root).free  # before the partial directory gives its space back
        full = free < FULL_DISK_BYTES
        shutil.rmtree(tmp, ignore_errors=True)
        previous = self.complete()
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "there is no earlier checkpoint"
        return OSError(errno.ENOSPC if full else getattr(err, "errno", None) or errno.EIO,
                       f"could not write the checkpoint of step {step} to {tmp} ({_last_line(err)}); "
                       f"{free / 2**20:.1f} MiB were free on {self.root}{' (the disk is full)' if full else ''}; "
                       f"{kept}; the partial directory is deleted. Fix the cause and rerun with --resume auto")

    def _discard(self, path: Path) -> None:
        """Delete a checkpoint directory: first renamed to a temporary name (atomic), so a kill during
        the deletion leaves no half-deleted directory under a checkpoint's name."""
        doomed = self.root / f".tmp-delete-{path.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def load_latest(self, load_shards) -> tuple[int, TrainerState] | None:
        """Load the newest checkpoint that loads: ``load_shards(dir)`` runs on every rank (collective)
        and must raise on a damaged checkpoint; a damaged one is reported and the previous one tried.
        Returns (step, trainer state), or None when there is no usable checkpoint."""
        for step, path in reversed(self.complete()):
            problem = _check_state(path, step)
            ok = _all_agree(problem is None)
            if ok:
                try:
                    load_shards(path)
                except Exception as err:  # noqa: BLE001  (any failure: fall back to the previous one)
                    problem = f"{type(err).__name__}: {err}"
                ok = _all_agree(problem is None)
            if ok:
                state = json.loads((path / STATE_FILE).read_text())
                state.pop(FILES_KEY, None)
                return step, state
            if self.rank == 0:
                log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path,
                            problem or "on another rank")
        return None


def _last_line(err: BaseException) -> str:
    """``Type: message`` of ``err``; for torch's CheckpointException (which embeds each rank's
    traceback) the last line, the underlying error."""
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[-1] if isinstance(err, CheckpointException) else text


def _check_state(path: Path, step: int) -> str | None:
    """What is wrong with the loop state of checkpoint ``path`` (None: nothing)."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        return f"{file}: {err}"
    if not isinstance(state, dict) or state.get("step") != step:
        return f"{file}: step {state.get('step') if isinstance(state, dict) else state!r} != {step} (directory name)"
    for name, size in state.get(FILES_KEY, {}).items():  # every file the save wrote, at its size
        written = path / name
        if not written.is_file():
            return f"{written}: missing (listed in {file})"
        if (actual := written.stat().st_size) != size:
            return f"{written}: {actual} bytes, {size} when saved (truncated or overwritten)"
    return None


def _all_agree(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    import torch

    value = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return int(value.item()) == 0
