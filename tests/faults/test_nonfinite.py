"""A non-finite loss or gradient: the update is skipped (weights untouched), logged, and after
trainer.max_nonfinite_steps in a row the run stops with finite weights in its last checkpoint."""

from __future__ import annotations

import math

import torch
from _faults import FAST, run_chaos
from safetensors.torch import load_file

from megatron_rl.checkpoint.convert import megatron_to_hf
from megatron_rl.trainer.metrics import read_metrics


def _weights(checkpoint, out):
    megatron_to_hf(checkpoint, out)
    return load_file(str(out / "model.safetensors"))


def test_nan_steps_are_skipped_and_k_in_a_row_stop_the_run(tmp_path):
    run = tmp_path / "run"
    args = (*FAST, "trainer.total_steps=6", "trainer.save_freq=1", "trainer.keep_last=6", "trainer.export_hf=false",
            "trainer.max_nonfinite_steps=2")
    proc = run_chaos(run, *args, nan_steps="2,4,5")  # 2 alone, then 4 and 5 in a row
    assert proc.returncode != 0
    assert "2 consecutive steps had a non-finite loss or grad norm" in proc.stderr, proc.stderr[-3000:]
    assert "step 2: non-finite loss nan / grad norm nan; update skipped" in proc.stderr

    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # step 5 stopped the run before it was logged
    assert [r["actor/update_successful"] for r in records] == [1.0, 0.0, 1.0, 0.0]
    assert records[1]["actor/loss"] is None and math.isfinite(records[2]["actor/loss"])

    weights = {step: _weights(run / "checkpoints" / f"step_{step:08d}", tmp_path / f"hf{step}") for step in (1, 2, 3, 4)}
    for name, value in weights[4].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(weights[2][name], weights[1][name]), name  # the NaN step left the weights as they were
        assert torch.equal(value, weights[3][name]), name
    assert any(not torch.equal(weights[3][n], weights[2][n]) for n in weights[3])  # step 3 did update
