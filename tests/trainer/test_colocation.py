"""The memory hand-over between the colocated engine and the trainer (trainer/colocation.py), step by
step, recorded from real runs: the engine sleeps after generating and wakes its weights, takes the
push, then wakes its KV cache (verl's and slime's order), every step, after a resume and around
validation; the optimizer state is on the device only for the update and the reference only for its
forward; the pipeline rank that never generates holds no engine. On CPU vLLM has no sleep mode, so the
engine calls free nothing, but VLLMEngine keeps the state and refuses to generate or take a push in
the wrong one, and ``rollout.check_weights=true`` compares every engine weight after each push.

The two runs (2 steps at PP=2 on two gloo processes, then a resumed 3rd) take one to three minutes
(most of it start-up): they are the only way to see the order as the trainer makes it, with resume and
validation in it, and they are the PP=2 run of the trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _trainer_runs import FAST, QUICKSTART, REPO, _env

from megatron_rl.trainer.colocation import Colocation, resolve_offload
from megatron_rl.trainer.metrics import read_metrics

RUNNER = Path(__file__).with_name("_recording_run.py")
SETTINGS = (*FAST, "parallel.pp=2", "algorithm.kl_coef=0.001", "rollout.check_weights=true",
            "memory.offload_optimizer='on'", "memory.offload_reference='on'", "trainer.test_freq=2",
            "trainer.val_limit=4", "trainer.save_freq=2", "trainer.export_hf=false")

PUSH = ["wake_up:weights", "load_weights", "wake_up:kv_cache"]
CHECKED_PUSH = ["wake_up:weights", "load_weights", "engine_weights", "wake_up:kv_cache"]
START = ["sleep", "reference_offload", "optimizer_to_host", *PUSH]  # the engine sleeps until the first push
UPDATE = ["reference_onload", "reference_offload", "optimizer_to_device", "update", "optimizer_to_host"]
STEP = ["generate", "sleep", *UPDATE, *CHECKED_PUSH]
VALIDATE = ["validate", "generate"]


def _run(events: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(RUNNER),
               str(events), str(QUICKSTART), f"trainer.output_dir={out}", *SETTINGS, *overrides]
    proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _load(events: Path) -> dict[int, dict]:
    return {rank: json.loads((events / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two steps, then the same run resumed from its step-2 checkpoint for a third."""
    root = tmp_path_factory.mktemp("colocation")
    out = root / "run"
    first = _run(root / "first", out, "trainer.total_steps=2")
    _run(root / "resumed", out, "trainer.total_steps=3")
    return {"first": _load(root / "first"), "resumed": _load(root / "resumed"), "stdout": first.stdout, "out": out}


def test_generating_rank_order_every_step_after_resume_and_around_validation(recorded) -> None:
    first, resumed = recorded["first"][0], recorded["resumed"][0]
    assert first["engine"] and resumed["engine"]
    assert first["events"] == [*START, *VALIDATE,  # step 0 validation: the engine is awake after the first push
                               *STEP,  # 1
                               *STEP, *VALIDATE, "save"]  # 2 (the last)
    assert resumed["events"] == [*START, *STEP, *VALIDATE, "save"]  # resumed at 2: step 3 only


def test_rank_that_never_generates_holds_no_engine(recorded) -> None:
    """pp_rank 1 never generates: no engine (no weights, KV cache or profile run), so no engine calls;
    its optimizer state and reference move like rank 0's."""
    other = ["reference_offload", "optimizer_to_host", "validate", *UPDATE, *UPDATE, "validate", "save"]
    assert recorded["first"][1] == {"engine": False, "events": other}
    assert recorded["resumed"][1] == {"engine": False,
                                      "events": ["reference_offload", "optimizer_to_host", *UPDATE, "validate", "save"]}


def test_the_runs_trained_and_said_their_device_first(recorded) -> None:
    assert recorded["stdout"].splitlines()[0].startswith("device: cpu (trainer.device=auto: ")
    records = read_metrics(recorded["out"] / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for record in records[1:]:  # the engine sampled with the trainer's weights after every push
        assert record["rollout/logprob_gap_mean"] < 1e-4 and record["actor/update_successful"] == 1.0
        assert record["time/offload_s"] >= 0.0


class _Engine:
    """An engine that only records (for the calls Colocation makes, without a run)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def sleep(self) -> None:
        self.log.append("sleep")

    def wake_up(self, tags=None) -> None:
        self.log.append(f"wake_up:{','.join(tags)}")

    def load_weights(self, weights) -> None:
        self.log.append("load_weights")


class _Sync:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def push(self, engine) -> dict[str, float]:
        self.log.append(f"push({'engine' if engine is not None else None})")
        return {"bytes": 1.0}

    def check(self, engine) -> None:
        self.log.append("check")


def test_push_wakes_weights_then_pushes_then_wakes_kv_cache() -> None:
    log: list[str] = []
    colocation = Colocation(_Engine(log))
    colocation.sleep_engine()
    assert colocation.push_weights(_Sync(log), check=True) == {"bytes": 1.0}
    assert log == ["sleep", "wake_up:weights", "push(engine)", "check", "wake_up:kv_cache"]


def test_ranks_without_engine_and_separate_engines_never_sleep() -> None:
    log: list[str] = []
    for colocation in (Colocation(None), Colocation(_Engine(log), sleeps=False)):
        colocation.sleep_engine()
        colocation.push_weights(_Sync(log))
        assert colocation.optimizer_to_device() == {} and colocation.optimizer_to_host() == {}
        with colocation.reference_on_device() as reference:
            assert reference is None
    assert log == ["push(None)", "push(engine)"]


@pytest.mark.parametrize(("mode", "auto", "expected"), [("on", False, True), ("off", True, False),
                                                         ("auto", True, True), ("auto", False, False)])
def test_offload_modes(mode: str, auto: bool, expected: bool) -> None:
    assert resolve_offload("memory.offload_reference", mode, auto=auto) is expected


def test_offload_mode_error_names_field_and_value() -> None:
    with pytest.raises(ValueError, match=r"memory.offload_optimizer=True must be one of 'auto', 'on', 'off'"):
        resolve_offload("memory.offload_optimizer", True, auto=False)
