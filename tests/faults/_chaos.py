"""`megatron-rl train` with one injected fault, for the tests in tests/faults (never part of the package).

    python tests/faults/_chaos.py [--kill PHASE:STEP:SECONDS --log FILE] [--nan-steps 2,4] -- train CONFIG ...

``--kill`` SIGKILLs the whole process group (start it in a new session) ``SECONDS`` after ``PHASE``
starts while the loop is at ``STEP`` (0 before the first step; ``sync`` at 0 is the
startup push), or as ``PHASE`` returns if that comes first: the kill lands
inside the phase. The moment is appended to the ``--log`` file first. Phases:

    prepare     creating the tiny model and the task files (step 0)
    sft         the SFT warm-up, including the export of its model (step 0)
    load        loading the newest checkpoint on resume (step 0)
    generate    sampling and scoring the step's rollouts
    update      advantages, logprobs and the optimizer step
    sync        pushing the new weights into the rollout engine
    checkpoint  writing the step's checkpoint
    metrics     appending the step's metrics line (STEP 0: the validation before training); at a
                checkpoint step this comes after the checkpoint's files, before its rename
    rename      renaming the step's finished checkpoint into place (what makes it count)
    export      writing hf/ after the last step (STEP = that step)

A SECONDS far beyond the phase's length (e.g. 1e6) kills exactly as the phase returns: just after
the metrics line is on disk, or just after the checkpoint's rename.

``--nan-steps`` makes the loss of those steps NaN (NaN advantages on every token), as a numerically
broken batch would: the update runs for real on the NaN loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time

PHASES = ("prepare", "sft", "load", "generate", "update", "sync", "checkpoint", "metrics", "rename", "export")

_state = {"step": 0}


_killing = threading.Lock()


def _kill_group(log_file: str, phase: str, step: int, seconds: float, when: str) -> None:
    if not _killing.acquire(blocking=False):  # the timer and the phase's return raced: one kill, one record
        while True:
            time.sleep(1)
    with open(log_file, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"phase": phase, "step": step, "seconds": seconds, "when": when}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _armed(function, phase: str, step: int, seconds: float, log_file: str):
    """``function``, but SIGKILL the process group inside it when it runs at ``step``."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        # CheckpointManager.save(self, step, ...) and MetricsWriter.log(self, step, ...) name their step
        current = args[1] if phase in ("checkpoint", "metrics") else _state["step"]
        if current != step:
            return function(*args, **kwargs)
        started = time.monotonic()
        timer = threading.Timer(seconds, _kill_group, (log_file, phase, step, seconds, "during"))
        timer.daemon = True
        timer.start()
        result = function(*args, **kwargs)
        timer.cancel()
        _kill_group(log_file, phase, step, time.monotonic() - started, "as it returned")
        return result

    return wrapper


def _install_kill(spec: str, log_file: str) -> None:
    from megatron_rl.trainer import loop, phases, setup
    from megatron_rl.trainer.checkpoint import CheckpointManager
    from megatron_rl.trainer.metrics import MetricsWriter
    from megatron_rl.weight_sync.sync import WeightSync

    phase, step, seconds = spec.split(":")
    if phase not in PHASES:
        raise SystemExit(f"--kill: unknown phase {phase!r}; one of {PHASES}")
    targets = {"prepare": (setup, "prepare_inputs"), "sft": (phases, "sft_warmup"),
               "load": (CheckpointManager, "load_latest"), "generate": (phases, "generate_and_score"),
               "update": (loop.Trainer, "update"), "sync": (WeightSync, "push"),
               "checkpoint": (CheckpointManager, "save"), "metrics": (MetricsWriter, "log"),
               "rename": (CheckpointManager, "_publish"), "export": (phases, "export_hf")}
    owner, name = targets[phase]
    setattr(owner, name, _armed(getattr(owner, name), phase, int(step), float(seconds), log_file))


def _track_steps() -> None:
    """Keep ``_state['step']`` at the loop's step: the resumed one while loading, then each step's."""
    from megatron_rl.trainer import loop

    step = loop.Trainer.step

    def tracked_step(self, number):
        _state["step"] = number
        return step(self, number)

    loop.Trainer.step = tracked_step


def _install_nan(steps: set[int]) -> None:
    import torch

    from megatron_rl.trainer import loop

    train_step = loop.train_step

    def poisoned(model, optimizer, micro_batches, **kwargs):
        if _state["step"] in steps:
            micro_batches = [dataclasses.replace(mb, advantages=torch.full_like(mb.advantages, float("nan")))
                             for mb in micro_batches]
        return train_step(model, optimizer, micro_batches, **kwargs)

    loop.train_step = poisoned


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill", help="PHASE:STEP:SECONDS")
    parser.add_argument("--log", help="where the kill is recorded (required with --kill)")
    parser.add_argument("--nan-steps", default="", help="comma-separated loop steps whose loss is NaN")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the megatron-rl command line")
    args = parser.parse_args()
    _track_steps()
    if args.kill:
        _install_kill(args.kill, args.log)
    if args.nan_steps:
        _install_nan({int(s) for s in args.nan_steps.split(",")})
    from megatron_rl.cli import main as cli_main

    return cli_main(args.cli[1:] if args.cli[:1] == ["--"] else args.cli)


if __name__ == "__main__":
    sys.exit(main())
