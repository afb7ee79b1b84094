"""Damaged checkpoints (a truncated shard, a missing shard, a state file whose step disagrees with its
directory): each is named on load, and resume falls back to the newest intact one and says so."""

from __future__ import annotations

import json

from _faults import FAST, comparable, run_train

from megatron_rl.trainer.metrics import read_metrics


def test_resume_names_each_damaged_checkpoint_and_falls_back_to_an_intact_one(tmp_path):
    run = tmp_path / "run"
    args = (*FAST, "trainer.total_steps=4", "trainer.save_freq=1", "trainer.keep_last=4", "trainer.export_hf=false")
    run_train(run, *args)
    uninterrupted = comparable(read_metrics(run / "metrics.jsonl"))
    step = {n: run / "checkpoints" / f"step_{n:08d}" for n in (1, 2, 3, 4)}
    truncated = step[4] / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    missing = step[3] / "__0_1.distcp"
    missing.unlink()
    state = json.loads((step[2] / "trainer_state.json").read_text())
    (step[2] / "trainer_state.json").write_text(json.dumps({**state, "step": 7}))

    proc = run_train(run, *args)
    assert f"{truncated}: 1000 bytes" in proc.stderr, proc.stderr[-3000:]
    assert f"{missing}: missing" in proc.stderr
    assert f"{step[2] / 'trainer_state.json'}: step 7 != 2" in proc.stderr
    assert proc.stderr.count("falling back to the previous one") == 3
    assert f"resumed from {step[1]} (step 1)" in proc.stdout
    assert "3 lines of steps after 1 dropped" in proc.stdout
    assert comparable(read_metrics(run / "metrics.jsonl")) == uninterrupted  # steps 2-4 again, identically
    assert json.loads((step[4] / "trainer_state.json").read_text())["step"] == 4  # rewritten whole
