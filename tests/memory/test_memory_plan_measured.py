"""The plan against bytes measured on CPU (fp32): parameters, the DDP gradient buffer and the optimizer
state (replicated and distributed, DP=2 over gloo), and the activations a micro-batch saves for its
backward, counted with saved_tensors_hooks (storages de-duplicated, parameters left out) around the
trainer's own train_step. Shapes: the tiny model and Qwen2.5-0.5B's widths and vocabulary with 2 layers
instead of 24 (each layer adds the same terms); micro-batches of 1 and 4 sequences of 24 + 40 tokens.

The activation counts are exact on CPU for these shapes today; 5% leaves room for small terms of the
loss (a few bytes per token) to change without the plan being wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import launch_ranks
from _measure import build, measured_state, micro_batches, run_config, step

WORKER = Path(__file__).resolve().parent / "_bytes_worker.py"
TOLERANCE = 0.05


def _plan(cfg, *, num_gpus: int = 1):
    """The plan of rank 0 (local_world_size 1: the CPU plan otherwise adds up the host's ranks)."""
    from megatron_rl.memory import hf_config_for, plan_run

    return plan_run(cfg, hf_config_for(cfg), num_gpus=num_gpus, device="cpu", device_bytes=1 << 40,
                    local_world_size=1)


def _close(measured: int, planned: int, what: str) -> None:
    assert abs(measured - planned) <= TOLERANCE * measured, f"{what}: measured {measured}, planned {planned}"


@pytest.mark.parametrize("shape", ["tiny", "qwen05"])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_plan_matches_measured_bytes(shape, recompute, model_dirs, world1) -> None:
    """DP=1, one model per case: micro-batches of 1 then 4 sequences, each step's saved activations
    against the plan's; then params, the fp32 gradient buffer and Adam's two fp32 moments (fp32 training
    keeps no master copy; Adam's state exists after the first step)."""
    from megatron_rl.memory import hf_config_for
    from megatron_rl.memory.measure import SavedActivations

    hf_config = hf_config_for(run_config(model_dirs[shape], micro=1))
    policy, optimizer = build(run_config(model_dirs[shape], micro=1, recompute=recompute), hf_config)
    for micro in (1, 4):
        cfg = run_config(model_dirs[shape], micro=micro, recompute=recompute)
        with SavedActivations(policy) as saved:
            step(policy, optimizer, cfg, hf_config, micro_batches(cfg, hf_config, rows=micro))
        assert len(saved.per_forward_bytes) == 1  # one micro-batch
        _close(saved.peak_bytes, _plan(cfg).phases["update"]["activations"], f"{shape} {recompute} micro {micro}")
        assert (saved.recompute_bytes > 0) == (recompute == "full")
    measured = measured_state(policy, optimizer)
    planned = _plan(cfg).phases["update"]
    for item in ("params", "grads", "optimizer"):
        _close(measured[item], planned[item], f"{shape} {item}")
    assert measured["grads"] == measured["params"]  # fp32 grads of fp32 params, no padding without ZeRO
    assert measured["optimizer"] >= 2 * measured["params"]  # exp_avg + exp_avg_sq


def test_state_bytes_match_the_plan_at_dp2(model_dirs, tmp_path) -> None:
    """DP=2 (gloo): the distributed optimizer keeps half the Adam state per rank (the plan: the larger
    rank's shard of the padded buffer); params and grads stay whole. 2 processes x 4 models: ~1 min
    on two loaded cores."""
    ranks = launch_ranks(WORKER, [str(model_dirs["tiny"].parent)], tmp_path, world_size=2, timeout_s=900)
    for shape in ("tiny", "qwen05"):
        for distributed in (False, True):
            planned = _plan(run_config(model_dirs[shape], micro=1, distributed=distributed), num_gpus=2)
            planned = planned.phases["update"]
            key = f"{shape}/{distributed}"
            for item in ("params", "grads", "optimizer"):
                measured = max(rank[key][item] for rank in ranks)
                _close(measured, planned[item], f"{key} {item}")
        whole = ranks[0][f"{shape}/False"]["optimizer"]
        shards = [rank[f"{shape}/True"]["optimizer"] for rank in ranks]
        assert sum(shards) == pytest.approx(whole, rel=0.01) and max(shards) < 0.6 * whole


def test_micro_batches_are_counted_one_at_a_time(model_dirs, world1) -> None:
    """Megatron's schedule runs forward, backward, forward, ...: four micro-batches of one sequence each
    save what one does (the plan's activations are per micro-batch at PP=1)."""
    from megatron_rl.memory import hf_config_for
    from megatron_rl.memory.measure import SavedActivations

    cfg = run_config(model_dirs["tiny"], micro=1)
    hf_config = hf_config_for(cfg)
    policy, optimizer = build(cfg, hf_config)
    with SavedActivations(policy) as saved:
        step(policy, optimizer, cfg, hf_config, micro_batches(cfg, hf_config, rows=4))
    assert len(saved.per_forward_bytes) == 4
    assert max(saved.per_forward_bytes) == min(saved.per_forward_bytes)
    _close(saved.peak_bytes, _plan(cfg).phases["update"]["activations"], "tiny micro 1 of 4")


def test_saved_activations_counter_by_hand() -> None:
    """y = (x * w).sum() with x (2, 3) fp32 needing no grad: autograd saves x (24 bytes) for w's gradient
    and w for x's (not needed, but mul saves what its inputs need: w only if x requires grad). The
    parameter w is left out; a view of x counts x's storage once."""
    from megatron_rl.memory.measure import SavedActivations

    w = torch.nn.Parameter(torch.ones(2, 3))
    model = torch.nn.Module()
    model.w = w
    x = torch.arange(6.0).reshape(2, 3)
    with SavedActivations(model) as saved:
        ((x * w).sum() + (x[:, :2] * w[:, :2]).sum()).backward()
    assert saved.per_forward_bytes == [24]
