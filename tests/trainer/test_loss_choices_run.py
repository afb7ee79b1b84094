"""The quickstart-sized run with each policy loss and with the critic: 2 steps each, finite losses, and the
policy's (and critic's) weights move.

Every case starts from the tiny random model (no SFT warm-up) with GAE advantages from the critic (the
random model cannot answer, so every reward is equal and an outcome estimator would give 0 advantages;
the critic's values make them non-zero), with the KL and entropy terms off, so the policy loss alone
moves the policy. The
"critic" case (the default ppo_clip loss) adds KL in the reward with the adaptive controller and a step
of value pre-training.
"""

from __future__ import annotations

import math

import pytest
import torch
from _trainer_runs import FAST, hf_weights, run_train
from safetensors.torch import load_file

from megatron_rl.algorithms import POLICY_LOSSES, SEQUENCE_LEVEL_AGGREGATION
from megatron_rl.checkpoint.megatron_io import CheckpointReader
from megatron_rl.megatron.critic import CRITIC_DIR
from megatron_rl.trainer.checkpoint import CheckpointManager
from megatron_rl.trainer.metrics import read_metrics

COMMON = (*FAST, "trainer.sft_warmup_steps=0", "algorithm.advantage=gae", "algorithm.kl_coef=0",
          "algorithm.entropy_coef=0", "trainer.total_steps=2")
SEQUENCE_LEVEL = {name: (f"algorithm.loss_agg={mode}",) for name, mode in SEQUENCE_LEVEL_AGGREGATION.items()}
CASES = {name: (f"algorithm.policy_loss={name}", *SEQUENCE_LEVEL.get(name, ())) for name in POLICY_LOSSES
         if name != "ppo_clip"}
CASES["clip_cov"] = (*CASES["clip_cov"], "algorithm.clip_cov.clip_cov_ratio=0.2")  # some tokens of 64 selected
CASES["kl_cov"] = (*CASES["kl_cov"], "algorithm.kl_cov.kl_cov_ratio=0.2")
CASES["critic"] = ("algorithm.kl_in_reward=true", "algorithm.kl_controller=adaptive", "algorithm.kl_horizon=10",
                   "critic.warmup_steps=1")


@pytest.mark.parametrize("case", list(CASES))
def test_two_steps_train_with_finite_losses(case, tmp_path) -> None:
    run_train(tmp_path, *COMMON, *CASES[case])
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    warmup = case == "critic"
    for record in records:
        for key in ("critic/vf_loss", "critic/grad_norm", "critic/returns_mean", "critic/values_mean"):
            assert math.isfinite(record[key]), (key, record)
        assert record["critic/update_successful"] == 1.0
    policy_steps = records[1:] if warmup else records
    for record in policy_steps:
        assert math.isfinite(record["actor/loss"]) and record["actor/grad_norm"] > 0, record
        assert record["actor/update_successful"] == 1.0
    if warmup:
        assert "actor/loss" not in records[0]  # value pre-training: the policy waits
        assert records[1]["kl_reward/coef"] != records[0]["kl_reward/coef"]  # the adaptive controller moved
    if case in ("clip_cov", "kl_cov"):
        assert any(r["actor/cov_frac"] > 0 for r in policy_steps)
    start, end = load_file(str(tmp_path / "tiny_model" / "model.safetensors")), hf_weights(tmp_path)
    assert any(not torch.equal(start[name], end[name]) for name in start)  # the policy moved
    step, path = CheckpointManager(tmp_path, keep_last=2).complete()[-1]
    head = CheckpointReader(path / CRITIC_DIR).read("output_layer.weight")
    hidden = head.shape[1]
    initial = torch.randn((1, hidden), generator=torch.Generator().manual_seed(0)) / math.sqrt(hidden + 1)
    assert step == 2 and not torch.equal(head, initial)  # the critic moved
