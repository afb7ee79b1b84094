"""Activation recompute: the same gradients as without it, fewer saved bytes, by the amount the plan says.

The tiny model (2 layers), fp32 on CPU, one micro-batch of 4 sequences of 24 + 40 tokens through the
trainer's train_step; Megatron's CheckpointFunction runs on the CPU RNG shims (megatron/cpu.py) as is.
"""

from __future__ import annotations

import pytest
import torch
from _measure import build, micro_batches, run_config, step

MICRO = 4


def _run(model_dirs, recompute: str, weights=None):
    from megatron_rl.megatron.optim import unwrap_ddp
    from megatron_rl.memory import hf_config_for
    from megatron_rl.memory.measure import SavedActivations

    cfg = run_config(model_dirs["tiny"], micro=MICRO, recompute=recompute)
    hf_config = hf_config_for(cfg)
    policy, optimizer = build(cfg, hf_config)
    if weights is not None:
        unwrap_ddp(policy).load_state_dict(weights)
    weights = {k: v.clone() if torch.is_tensor(v) else v for k, v in unwrap_ddp(policy).state_dict().items()}
    with SavedActivations(policy) as saved:
        metrics = step(policy, optimizer, cfg, hf_config, micro_batches(cfg, hf_config, rows=MICRO))
    grads = {name: p.main_grad.detach().clone() for name, p in unwrap_ddp(policy).named_parameters()}
    return {"cfg": cfg, "weights": weights, "saved": saved.peak_bytes, "grads": grads, "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"]}


@pytest.fixture(scope="module")
def runs(model_dirs, world1):
    none = _run(model_dirs, "none")
    return {"none": none, **{mode: _run(model_dirs, mode, none["weights"]) for mode in ("selective", "full")}}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_gradients(runs, mode) -> None:
    reference, run = runs["none"], runs[mode]
    assert run["loss"] == pytest.approx(reference["loss"], abs=1e-6)
    assert run["grad_norm"] == pytest.approx(reference["grad_norm"], abs=1e-6)
    assert reference["grad_norm"] > 0
    for name, grad in reference["grads"].items():
        assert torch.allclose(run["grads"][name], grad, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_saves_what_the_plan_says(runs, mode) -> None:
    from megatron_rl.memory import hf_config_for, plan_run

    def planned(cfg) -> int:
        return plan_run(cfg, hf_config_for(cfg), num_gpus=1, device="cpu", device_bytes=1 << 40,
                        local_world_size=1).phases["update"]["activations"]

    saved_measured = runs["none"]["saved"] - runs[mode]["saved"]
    saved_planned = planned(runs["none"]["cfg"]) - planned(runs[mode]["cfg"])
    assert saved_measured > 0
    assert saved_planned == pytest.approx(saved_measured, rel=0.05)
