"""SIGKILL at 20 moments across a quickstart run, with a busy process beside it: 17 at seeded random
moments (startup, SFT warm-up, checkpoint load, generation, update, weight sync, checkpoint write,
HF export) and 3 aimed at the metrics line of a step and its checkpoint (just after the step-0
validation line; at a checkpoint step, just after its line and before the checkpoint's rename; just
after a rename). After every kill the newest complete checkpoint is intact and no older than before,
and the metrics lines it covers are exactly one per step; `--resume auto` then reaches the end with
the same weights (bitwise) and the same metrics as a run that was never interrupted."""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from _faults import FAST, comparable, hf_weights, run_chaos, run_train

from megatron_rl.trainer.checkpoint import CheckpointManager
from megatron_rl.trainer.metrics import read_metrics

STEPS, SAVE_FREQ = 8, 2
# One epoch of 32 prompts in batches of 4 is the run's 8 steps (trainer.total_epochs); validation with
# 2 samples per prompt before the first step (the step-0 line), at step 4 and after the last.
ARGS = (*FAST, "data.builtin_num_train=32", "trainer.total_epochs=1", f"trainer.save_freq={SAVE_FREQ}",
        "trainer.keep_last=2", "trainer.test_freq=4", "rollout.val_n=2", "rollout.val_temperature=1.0")
# How long each phase takes here (seconds, roughly): a kill comes at a uniform moment within it, or
# as the phase returns when it is shorter than the draw.
TYPICAL_SECONDS = {"prepare": 3.0, "sft": 6.0, "load": 2.0, "generate": 1.0, "update": 1.0, "sync": 0.1,
                   "checkpoint": 2.0, "export": 1.0}
AS_IT_RETURNS = 1e6  # seconds: longer than any phase, so the kill comes exactly as the phase returns
AIMED = ("metrics", "rename")  # killed as they return: just after a metrics line, just after a checkpoint's rename


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run never interrupted, which every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_train(out, *ARGS)
    assert f"run length: {STEPS} steps (trainer.total_epochs=1 x {STEPS} batches of 4 prompts" in proc.stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(STEPS + 1))
    return out


def kill_schedule(rng: random.Random) -> list[tuple[str, int, float]]:
    """20 kills (phase, step, seconds into the phase), in an order in which each is sure to be reached
    whatever the kills before it left behind: by step, and at a step its checkpoint write, then its
    metrics line, then its checkpoint's rename after its other phases.

    Startup: creating the inputs, the SFT warm-up, just after the step-0 validation line (before any
    checkpoint: the rerun must not write the line twice), the first weight push, loading a
    checkpoint. The loop: 3 in generation, 3 in the update, 2 in the weight sync (at random steps),
    one in each checkpoint write; just after step 4's line (before its checkpoint's rename) and just
    after step 6's checkpoint rename. The end: the HF export."""
    loop = [(phase, rng.randint(1, STEPS)) for phase in ["generate"] * 3 + ["update"] * 3 + ["sync"] * 2]
    loop += [("checkpoint", step) for step in range(SAVE_FREQ, STEPS + 1, SAVE_FREQ)]
    loop += [("metrics", 4), ("rename", 6)]
    order = {"checkpoint": 1, "metrics": 2, "rename": 3}
    loop.sort(key=lambda kill: (kill[1], order.get(kill[0], 0)))
    first_save = next(i for i, kill in enumerate(loop) if kill[0] == "checkpoint")
    loop.insert(first_save + 1, ("load", 0))  # a resume that loads the first checkpoint (if it completed)
    loop.insert(rng.randint(0, len(loop)), ("sync", 0))  # the startup push
    kills = [("prepare", 0), ("sft", 0), ("metrics", 0), *loop, ("export", STEPS)]
    return [(phase, step, AS_IT_RETURNS if phase in AIMED else round(rng.uniform(0, TYPICAL_SECONDS[phase]), 3))
            for phase, step in kills]


def _newest_checkpoint(run) -> int:
    complete = CheckpointManager(run, keep_last=2).complete()
    return complete[-1][0] if complete else 0


def _assert_checkpoints_intact(run) -> None:
    """Every directory under a checkpoint's name holds all the files its save wrote, at their sizes."""
    for step, path in CheckpointManager(run, keep_last=2).complete():
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["step"] == step
        for name, size in state["files"].items():
            assert (path / name).stat().st_size == size, (path / name)


def _assert_one_line_per_covered_step(run, what: str) -> None:
    """The metrics lines a resume keeps (those of steps up to the newest checkpoint, none without
    one) are exactly one per step: the step-0 validation, then 1..newest."""
    newest = _newest_checkpoint(run)
    if not newest:
        return
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["step"] <= newest]
    assert steps == list(range(newest + 1)), f"{what}: lines up to checkpoint {newest}: steps {steps}"


def _kill(run, phase: str, step: int, seconds: float, kill_log) -> None:
    before = _newest_checkpoint(run)
    proc = run_chaos(run, *ARGS, kill=f"{phase}:{step}:{seconds}", kill_log=kill_log)
    assert proc.returncode == -signal.SIGKILL, (
        f"{phase}:{step} was not reached ({proc.returncode}):\n{proc.stderr[-4000:]}")
    _assert_checkpoints_intact(run)
    assert _newest_checkpoint(run) >= before, f"the kill at {phase}:{step} lost a checkpoint"
    _assert_one_line_per_covered_step(run, f"after the kill at {phase}:{step}")


def _resume_and_compare(run, reference) -> None:
    """Resume to the end: the same weights (bitwise) and metrics (but wall times) as the reference."""
    proc = run_train(run, *ARGS)  # --resume auto is the default
    assert "resumed from" in proc.stdout
    expected, got = hf_weights(reference), hf_weights(run)
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert comparable(read_metrics(run / "metrics.jsonl")) == comparable(read_metrics(reference / "metrics.jsonl"))
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


def test_twenty_kills_then_resume_reproduce_the_uninterrupted_run(tmp_path, reference, cpu_load, fuzz_tally):
    run = tmp_path / "run"
    schedule = kill_schedule(random.Random(20261125))
    assert len(schedule) == 20
    kill_log = tmp_path / "kills.jsonl"
    for phase, step, seconds in schedule:
        _kill(run, phase, step, seconds, kill_log)
        fuzz_tally[f"kill/{phase}"] += 1

    kills = [json.loads(line) for line in kill_log.read_text().splitlines()]
    assert [(k["phase"], k["step"]) for k in kills] == [(phase, step) for phase, step, _ in schedule]
    _resume_and_compare(run, reference)
    fuzz_tally["kill/injected"] += len(kills)
    fuzz_tally["kill/survived (bitwise-equal final weights)"] += len(kills)
    fuzz_tally["kill/during phase, not at its end"] += sum(k["when"] == "during" for k in kills)
    fuzz_tally["kill/aimed at a metrics line or a checkpoint rename"] += sum(k["phase"] in AIMED for k in kills)
