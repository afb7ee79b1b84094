"""What a run checks at start, before it builds any model: the memory plan (``memory.check``: the plan's
``check_run_fits``, faked here so the test does not depend on the plan's numbers) and how
``memory.offload_optimizer`` resolves from it."""

from __future__ import annotations

import os
import types

import pytest

import megatron_rl.memory as memory
from megatron_rl.config import load_config
from megatron_rl.megatron.parallel import destroy_parallel, local_world_env
from megatron_rl.trainer import setup
from megatron_rl.trainer.loop import Trainer


class Refused(RuntimeError):
    """Stands in for the plan's InsufficientMemoryError (a RuntimeError)."""


@pytest.fixture
def world_env(monkeypatch: pytest.MonkeyPatch):
    for key, value in local_world_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    yield
    destroy_parallel()


def test_a_run_that_does_not_fit_is_refused_before_any_model_is_built(tmp_path, monkeypatch, world_env) -> None:
    calls = []

    def check_run_fits(cfg, hf_config, *, world_size: int, local_world_size: int):
        calls.append((hf_config.num_hidden_layers, world_size, local_world_size))
        raise Refused("needs 81.2 GiB per GPU, the device has 79.6 GiB: largest items ...")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the memory check")

    monkeypatch.setattr(memory, "check_run_fits", check_run_fits, raising=False)
    monkeypatch.setattr(setup, "build_policy", no_model)
    monkeypatch.setattr(setup, "build_engine", no_model)
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}", "data.builtin_tasks=easy", "data.builtin_num_train=8",
                             "data.builtin_num_test=2", "data.batch_size=2", "rollout.n=2",
                             "algorithm.micro_batch_size=4"])
    with pytest.raises(Refused, match="needs 81.2 GiB per GPU"):
        Trainer(cfg)
    assert calls == [(2, 1, 1)]  # the tiny model's config.json, a world of one process on one host


def test_memory_check_false_makes_the_plan_only_for_auto_offload(monkeypatch) -> None:
    """memory.check=false: no plan at all once both offload switches are set (the way out when the plan
    cannot model a run); with offload_optimizer=auto the plan is made (check_run_fits never refuses then)."""
    monkeypatch.setattr(memory, "check_run_fits", lambda *a, **k: "plan", raising=False)
    info = types.SimpleNamespace(world_size=1)
    assert setup.check_memory(load_config(None, ["memory.check=false", "memory.offload_optimizer='off'"]), object(),
                              info) is None
    assert setup.check_memory(load_config(None, ["memory.check=false"]), object(), info) == "plan"


@pytest.mark.parametrize(("mode", "planned", "expected"), [
    ("auto", True, True), ("auto", False, False), ("auto", None, False),  # None: no plan (memory.check=false)
    ("'on'", False, True), ("'off'", True, False)])
def test_offload_optimizer_follows_the_plan_on_auto(mode: str, planned: bool | None, expected: bool) -> None:
    cfg = load_config(None, [f"memory.offload_optimizer={mode}"])
    plan = None if planned is None else types.SimpleNamespace(offload_optimizer=planned)
    assert setup.offload_optimizer(cfg, plan) is expected


def test_local_world_size_defaults_to_one(monkeypatch) -> None:
    seen = {}
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(memory, "check_run_fits", lambda cfg, hf, **kw: seen.update(kw) or "plan", raising=False)
    assert setup.check_memory(load_config(None, []), object(), types.SimpleNamespace(world_size=8)) == "plan"
    assert seen == {"world_size": 8, "local_world_size": 1}
    assert os.environ.get("LOCAL_WORLD_SIZE") is None
