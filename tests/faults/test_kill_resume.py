"""SIGKILL at 20 random moments across a quickstart run (startup, SFT warm-up, checkpoint load,
generation, update, weight sync, checkpoint write, HF export): after every kill the newest complete
checkpoint is intact and no older than before, and `--resume auto` reaches the end with the same
weights (bitwise) and the same metrics as a run that was never interrupted."""

from __future__ import annotations

import json
import random
import signal

import torch
from _faults import FAST, comparable, hf_weights, run_chaos, run_train

from megatron_rl.trainer.checkpoint import CheckpointManager
from megatron_rl.trainer.metrics import read_metrics

STEPS, SAVE_FREQ = 8, 2
ARGS = (*FAST, f"trainer.total_steps={STEPS}", f"trainer.save_freq={SAVE_FREQ}", "trainer.keep_last=2")
# How long each phase takes here (seconds, roughly): a kill comes at a uniform moment within it, or
# as the phase returns when it is shorter than the draw.
TYPICAL_SECONDS = {"prepare": 3.0, "sft": 6.0, "load": 2.0, "generate": 1.0, "update": 1.0, "sync": 0.1,
                   "checkpoint": 2.0, "export": 1.0}


def kill_schedule(rng: random.Random) -> list[tuple[str, int, float]]:
    """20 kills (phase, step, seconds into the phase), in an order in which each is sure to be reached
    whatever the kills before it left behind: by step, and a step's checkpoint after its other phases.

    Startup: creating the inputs, the SFT warm-up, the first weight push, loading a checkpoint. The
    loop: 4 in generation, 4 in the update, 3 in the weight sync (at random steps), one in each
    checkpoint write. The end: the HF export."""
    loop = [(phase, rng.randint(1, STEPS)) for phase in ["generate"] * 4 + ["update"] * 4 + ["sync"] * 3]
    loop += [("checkpoint", step) for step in range(SAVE_FREQ, STEPS + 1, SAVE_FREQ)]
    loop.sort(key=lambda kill: (kill[1], kill[0] == "checkpoint"))
    first_save = next(i for i, kill in enumerate(loop) if kill[0] == "checkpoint")
    loop.insert(first_save + 1, ("load", 0))  # a resume that loads the first checkpoint (if it completed)
    loop.insert(rng.randint(0, len(loop)), ("sync", 0))  # the startup push
    kills = [("prepare", 0), ("sft", 0), *loop, ("export", STEPS)]
    return [(phase, step, round(rng.uniform(0, TYPICAL_SECONDS[phase]), 3)) for phase, step in kills]


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


def test_twenty_random_kills_then_resume_reproduce_the_uninterrupted_run(tmp_path, fuzz_tally):
    reference, run = tmp_path / "reference", tmp_path / "run"
    run_train(reference, *ARGS)
    schedule = kill_schedule(random.Random(20261125))
    assert len(schedule) == 20
    kill_log = tmp_path / "kills.jsonl"
    for attempt, (phase, step, seconds) in enumerate(schedule):
        before = _newest_checkpoint(run)
        proc = run_chaos(run, *ARGS, kill=f"{phase}:{step}:{seconds}", kill_log=kill_log)
        assert proc.returncode == -signal.SIGKILL, (
            f"attempt {attempt}: {phase}:{step} was not reached ({proc.returncode}):\n{proc.stderr[-4000:]}")
        _assert_checkpoints_intact(run)
        assert _newest_checkpoint(run) >= before, f"attempt {attempt} ({phase}:{step}) lost a checkpoint"
        fuzz_tally[f"kill/{phase}"] += 1

    kills = [json.loads(line) for line in kill_log.read_text().splitlines()]
    assert [(k["phase"], k["step"]) for k in kills] == [(phase, step) for phase, step, _ in schedule]

    proc = run_train(run, *ARGS)  # --resume auto is the default
    assert "resumed from" in proc.stdout
    expected, got = hf_weights(reference), hf_weights(run)
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert comparable(read_metrics(run / "metrics.jsonl")) == comparable(read_metrics(reference / "metrics.jsonl"))
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    fuzz_tally["kill/injected"] += len(kills)
    fuzz_tally["kill/survived (bitwise-equal final weights)"] += len(kills)
    fuzz_tally["kill/during phase, not at its end"] += sum(k["when"] == "during" for k in kills)

