"""PPO with a critic (GAE, KL in the reward with the adaptive controller, one value pre-training step)
survives SIGKILLs: killed in the update after a checkpoint and in the middle of a checkpoint write,
`--resume auto` reaches the end with the policy's weights, the critic's weights and optimizer state, and
the metrics (the controller's coefficient among them) equal to a run never interrupted, bit for bit."""

from __future__ import annotations

import signal

import pytest
import torch
from _faults import FAST, comparable, hf_weights, run_chaos, run_train

from megatron_rl.checkpoint.megatron_io import CheckpointReader
from megatron_rl.megatron.critic import CRITIC_DIR
from megatron_rl.trainer.checkpoint import CheckpointManager
from megatron_rl.trainer.metrics import read_metrics

STEPS = 4
ARGS = (*FAST, "algorithm.advantage=gae", "algorithm.kl_in_reward=true", "algorithm.kl_controller=adaptive",
        "algorithm.kl_horizon=100", "critic.warmup_steps=1", f"trainer.total_steps={STEPS}", "trainer.save_freq=2")


def critic_tensors(run) -> dict[str, torch.Tensor]:
    """Every tensor (model and optimizer) of the critic in the run's last checkpoint."""
    step, path = CheckpointManager(run, keep_last=2).complete()[-1]
    assert step == STEPS
    reader = CheckpointReader(path / CRITIC_DIR)
    return {key: reader.read(key) for key in reader.tensor_shapes()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_critic")
    run_train(out, *ARGS)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert "actor/loss" not in records[0] and "actor/loss" in records[1]  # step 1 trains the critic only
    assert all("critic/vf_loss" in r for r in records)
    assert records[-1]["kl_reward/coef"] != records[0]["kl_reward/coef"]  # the controller moved
    return out


def test_kills_in_update_and_checkpoint_then_resume_are_bitwise(tmp_path, reference, cpu_load):
    run = tmp_path / "run"
    log = tmp_path / "kills.jsonl"
    for phase, step, seconds in (("update", 3, 0.5), ("checkpoint", 4, 0.3)):
        proc = run_chaos(run, *ARGS, kill=f"{phase}:{step}:{seconds}", kill_log=log)
        assert proc.returncode == -signal.SIGKILL, f"{phase}:{step} not reached:\n{proc.stderr[-3000:]}"
        assert CheckpointManager(run, keep_last=2).complete()[-1][0] == 2
    proc = run_train(run, *ARGS)
    assert "resumed from" in proc.stdout
    expected, got = hf_weights(reference), hf_weights(run)
    assert sorted(expected) == sorted(got) and all(torch.equal(expected[n], got[n]) for n in expected)
    expected_critic, got_critic = critic_tensors(reference), critic_tensors(run)
    assert sorted(expected_critic) == sorted(got_critic)
    assert any(key.startswith("optimizer.") for key in got_critic)  # Adam's state is in the checkpoint
    for key, tensor in expected_critic.items():
        assert torch.equal(tensor, got_critic[key]), key
    assert comparable(read_metrics(run / "metrics.jsonl")) == comparable(read_metrics(reference / "metrics.jsonl"))
