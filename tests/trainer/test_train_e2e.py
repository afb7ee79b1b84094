"""`megatron-rl train` end to end on CPU: the run directory contract (metrics.jsonl, checkpoints/, hf/,
reward.png), TP=2, rollout-only then replay. Kills and exact resume: tests/faults/test_kill_resume.py."""

from __future__ import annotations

import json

import pytest
import torch
from _trainer_runs import FAST, hf_weights, run_train
from transformers import AutoModelForCausalLM

from megatron_rl.trainer.checkpoint import STATE_FILE
from megatron_rl.trainer.metrics import read_metrics

SIX_STEPS = (*FAST, "trainer.total_steps=6", "trainer.save_freq=3")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run, never interrupted: the reference the interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_train(out, *SIX_STEPS)
    return out


def test_run_directory_contract(uninterrupted):
    records = read_metrics(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        for key in ("reward/mean", "time/step_s", "time/generate_s", "time/update_s", "time/sync_s",
                    "actor/grad_norm", "actor/entropy", "rollout/logprob_gap_mean", "response_length/mean"):
            assert isinstance(record[key], float), (key, record)
        # trainer and engine hold the same weights when the engine samples: the logprobs agree
        assert record["rollout/logprob_gap_mean"] < 1e-4
        assert record["actor/grad_norm"] > 0 and record["actor/update_successful"] == 1.0
    checkpoints = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003", "step_00000006"]
    assert json.loads((uninterrupted / "checkpoints" / "step_00000006" / STATE_FILE).read_text())["step"] == 6
    assert (uninterrupted / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(uninterrupted / "hf")
    weights = hf_weights(uninterrupted)
    assert torch.equal(model.model.embed_tokens.weight, weights["model.embed_tokens.weight"])
    start = hf_weights_of(uninterrupted / "sft_model")
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"], weights["model.layers.0.mlp.up_proj.weight"])


def hf_weights_of(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_tensor_parallel_run_with_weight_checks(tmp_path):
    """TP=2 on two gloo processes, the engine multiplying by plain weights (syncs copy in place): two
    steps, the engine's weights checked against the trainer's after every sync (the run fails
    otherwise), then an HF export transformers loads."""
    run_train(tmp_path, *FAST, "parallel.tp=2", "trainer.total_steps=2", "rollout.check_weights=true",
              "rollout.cpu_gemm=plain", nproc=2)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["rollout/logprob_gap_mean"] < 1e-4 for r in records)
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_rollout_only_then_replay(tmp_path):
    """Debug modes: rollout-only saves every scored response and never updates; train-only replays
    those rollouts step by step (the same rewards) and updates. The rollout-only run also samples
    dynamically: FAST's rewards are all equal, so every round's groups are set aside and, after the
    last round, fill the batch."""
    saved = tmp_path / "rollouts"
    run_train(saved, *FAST, "trainer.total_steps=2", "trainer.rollout_only=true", "algorithm.dynamic_sampling=true")
    lines = [json.loads(line) for line in (saved / "rollouts.jsonl").read_text().splitlines()]
    assert [sum(1 for r in lines if r["step"] == s) for s in (1, 2)] == [16, 16]  # 4 prompts x 4 samples
    assert not (saved / "hf").exists()
    saved_records = read_metrics(saved / "metrics.jsonl")
    assert all("actor/grad_norm" not in r for r in saved_records)
    assert all(r["reward/std"] == 0.0 for r in saved_records)
    assert [(r["sampling/rounds"], r["sampling/equal_reward_groups"]) for r in saved_records] == [(3.0, 12.0)] * 2
    replay = tmp_path / "replay"
    run_train(replay, *FAST, "trainer.total_steps=2", f"trainer.replay_rollouts={saved / 'rollouts.jsonl'}",
              "trainer.export_hf=false")
    replayed = read_metrics(replay / "metrics.jsonl")
    assert [r["reward/mean"] for r in replayed] == [r["reward/mean"] for r in saved_records]
    assert all(r["actor/grad_norm"] > 0 for r in replayed)
