"""The policy update: AdamW through Megatron's DDP + optimizer, one PPO train step, the frozen reference.

Single process (TP=1): the step-0 KL to the reference is exactly 0 and a few steps on a fixed batch
lower the loss. Two processes (gloo): TP=2, PP=2 (1F1B) and DP=2 (distributed optimizer), and four:
TP=2 x PP=2, give the TP=1 losses, grad norms, logprobs and updated weights (gathered to HF names)
within fp32 tolerances. Distributed checkpoints (model + Adam state + iteration) resume exactly at the
same layout and within those tolerances at another one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import TRAIN_LR, launch_ranks, load_hf_state, run_training
from transformers import AutoConfig

WORKER = Path(__file__).resolve().parent / "_train_worker.py"
NUM_STEPS = 2  # Adam steps compared across layouts


def test_settings_are_validated() -> None:
    from megatron_rl.megatron.optim import OptimizerSettings
    from megatron_rl.megatron.train_step import LossSettings, MicroBatch

    defaults = OptimizerSettings()  # Med-U1: constant lr 1e-6, betas 0.9/0.999, wd 0.01, clip 1.0
    assert (defaults.lr, defaults.beta1, defaults.beta2, defaults.weight_decay, defaults.clip_grad) == (
        1e-6, 0.9, 0.999, 0.01, 1.0)
    with pytest.raises(ValueError, match="lr=0"):
        OptimizerSettings(lr=0)
    with pytest.raises(ValueError, match="beta2=1.0"):
        OptimizerSettings(beta2=1.0)
    with pytest.raises(ValueError, match="kl_kind='k9'"):
        LossSettings(kl_kind="k9")
    with pytest.raises(ValueError, match=r"advantages has shape \(1, 5\); expected"):
        MicroBatch(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4),
                   torch.zeros(1, 5))


def test_optimizer_is_megatron_adamw_with_the_settings(qwen2_dirs, world1) -> None:
    from _helpers import build_policy_and_reference

    policy, optimizer, _reference, _config = build_policy_and_reference(qwen2_dirs[True], world1, lr=3e-6)
    assert optimizer.config.clip_grad == 1.0 and not optimizer.config.bf16  # fp32 on CPU
    torch_optimizer = optimizer.optimizer
    assert isinstance(torch_optimizer, torch.optim.AdamW)  # the torch fallback (no apex / TE here)
    groups = torch_optimizer.param_groups
    assert {g["lr"] for g in groups} == {3e-6}
    assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.999)}
    # megatron-core 0.16.1 without config_overrides decays every parameter (as verl's torch AdamW does).
    assert {g["weight_decay"] for g in groups} == {0.01}
    num_params = sum(p.numel() for g in groups for p in g["params"])
    assert num_params == sum(p.numel() for p in policy.parameters())


@pytest.fixture(scope="module")
def tp1_training(qwen2_dirs, world1) -> dict:
    """The TP=PP=DP=1 reference run: NUM_STEPS steps at TRAIN_LR, in this process."""
    return run_training(qwen2_dirs[True], world1, num_steps=NUM_STEPS)


def test_step0_kl_is_zero_and_loss_decreases(qwen2_dirs, world1) -> None:
    result = run_training(qwen2_dirs[True], world1, num_steps=5)
    first = result["metrics"][0]
    # Policy == reference == the old policy at step 0: every ratio is 1, the KL is exactly 0, nothing is
    # clipped, and the loss is -sum(A)/N over the valid tokens, which is 0 for this batch (A = +1, -1 on
    # 5 and 7 tokens, +0.5, -0.5 on 7 and 3: 5 - 7 + 3.5 - 1.5 = 0), up to fp32 rounding.
    assert first["kl"] == 0.0 and first["ppo_kl"] == 0.0 and first["approx_kl"] == 0.0
    assert first["clip_frac_low"] == first["clip_frac_high"] == first["clip_frac_dual"] == 0.0
    assert abs(first["loss"]) < 1e-7 and first["update_successful"] == 1.0
    assert first["grad_norm"] > 1.0  # the clip (1.0) is active: Adam's step size does not depend on it
    losses = [m["loss"] for m in result["metrics"]]
    # Measured: 0.0, -0.1275, -0.1805, -0.1854, -0.1853. The ratios then sit at the clip bounds
    # (-(sum over tokens of A * clipped ratio) / N = -0.19) and the KL term (coef 1e-3) starts to grow.
    assert losses[1] < losses[0] - 0.05 and losses[2] < losses[1]
    assert losses[-1] < losses[0] - 0.15, losses
    assert result["metrics"][-1]["kl"] > 0


def test_reference_check_catches_different_weights(qwen2_dirs, world1) -> None:
    from _helpers import build_policy_and_reference, train_batch

    from megatron_rl.megatron.reference import check_reference_matches_policy

    policy, _optimizer, reference, config = build_policy_and_reference(qwen2_dirs[True], world1)
    ids, _mask, _advantages = train_batch(config.vocab_size)
    with torch.no_grad():
        reference.decoder.final_layernorm.weight[0] += 1e-3
    with pytest.raises(ValueError, match="differ before the first update"):
        check_reference_matches_policy(policy, reference, ids, vocab_size=config.vocab_size)


@pytest.fixture(scope="module")
def two_rank_dir(tmp_path_factory) -> Path:
    """Where the 2-process run writes its results and checkpoints."""
    return tmp_path_factory.mktemp("train_two_ranks")


@pytest.fixture(scope="module")
def two_rank_training(qwen2_dirs, two_rank_dir) -> list[dict]:
    """TP=2, PP=2 and DP=2 (distributed optimizer), NUM_STEPS steps each, plus the checkpoint resumes
    (see _train_worker.py), from one launch of 2 processes."""
    return launch_ranks(WORKER, ["2x1,1x2,1x1", str(qwen2_dirs[True]), str(NUM_STEPS)], two_rank_dir, world_size=2,
                        timeout_s=120)


def gathered_hf_weights(results: list[dict], config) -> dict[str, torch.Tensor]:
    """HF-named full weights from every rank's parameters (DP replicas must agree exactly)."""
    from megatron_rl.checkpoint.qwen2 import megatron_shards_to_hf

    info0 = results[0]["info"]
    shards = [[None] * info0.tp_size for _ in range(info0.pp_size)]
    for result in results:
        info = result["info"]
        if info.dp_rank == 0:
            shards[info.pp_rank][info.tp_rank] = result["params"]
    for result in results:
        info = result["info"]
        replica0 = shards[info.pp_rank][info.tp_rank]
        assert all(torch.equal(result["params"][n], replica0[n]) for n in replica0)
    return megatron_shards_to_hf(shards, config)


def assert_trains_like_tp1(results: list[dict], tp1_training: dict, config, initial: dict) -> None:
    """Per-step metrics, logprobs after training and updated weights equal the TP=1 run's (tolerances:
    see the comments)."""
    from megatron_rl.checkpoint.qwen2 import megatron_shards_to_hf

    assert {r["num_tokens"] for r in results} == {tp1_training["num_tokens"]} == {22}
    for rank in results:  # every rank reports the same (global) metrics
        assert rank["metrics"] == results[0]["metrics"]
    for step, (got, want) in enumerate(zip(results[0]["metrics"], tp1_training["metrics"], strict=True)):
        # Step 0 runs the same weights: KL exactly 0 in every layout. Losses and norms are fp32 sums in
        # another order (TP: partial matmul sums + all-reduce; DP: gradients reduce-scattered; PP: the
        # same ops); measured |loss diff| <= 1.5e-6, grad-norm relative diff <= 5e-6.
        assert got["kl"] == 0.0 or step > 0
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), (step, got, want)
        assert got["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-9), (step, got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-5), (step, got, want)
    # Every rank holds the same logprobs (TP reduces, PP broadcasts, DP replicas agree).
    assert all(torch.equal(r["logprobs"], results[0]["logprobs"]) for r in results)
    # After 2 updates the weights differ by a few fp32 ulps (below), which moves logprobs of up to ~30
    # nats by ~1e-5 (measured max 1.1e-5).
    torch.testing.assert_close(results[0]["logprobs"], tp1_training["logprobs"], atol=5e-5, rtol=1e-5)
    weights = gathered_hf_weights(results, config)
    tp1_weights = megatron_shards_to_hf([[tp1_training["params"]]], config)
    assert sorted(weights) == sorted(tp1_weights)
    # Each Adam step moves a weight by up to ~lr (1e-5): 2 steps move the largest ones by 2e-5. Weights of
    # size ~1 have an fp32 ulp of 1.2e-7; measured max |diff| 5.2e-7 (a few ulps, and for weights whose
    # gradient is ~eps Adam's normalised step itself depends on the last bits). A lost, doubled or
    # wrong-signed update of any weight would differ by >= 1e-5.
    for name, weight in weights.items():
        torch.testing.assert_close(weight, tp1_weights[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    moved = max((tp1_weights[n] - initial[n]).abs().max().item() for n in tp1_weights)
    assert 1.5 * TRAIN_LR < moved <= NUM_STEPS * TRAIN_LR * 1.1  # real updates (Adam: |step| ~ lr)


@pytest.mark.parametrize("layout", ["2x1", "1x2", "1x1"], ids=["tp2", "pp2", "dp2-distopt"])
def test_two_ranks_train_like_one(layout, qwen2_dirs, tp1_training, two_rank_training) -> None:
    results = [rank_results[layout] for rank_results in two_rank_training]
    tp, pp = (int(n) for n in layout.split("x"))
    assert [(r["info"].tp_size, r["info"].pp_size, r["info"].dp_size) for r in results] == [(tp, pp, 2 // (tp * pp))] * 2
    assert_trains_like_tp1(results, tp1_training, AutoConfig.from_pretrained(qwen2_dirs[True]),
                           load_hf_state(qwen2_dirs[True]))


def test_tp2_pp2_on_four_ranks_trains_like_one(qwen2_dirs, tp1_training, tmp_path) -> None:
    """TP=2 x PP=2 (4 processes on this 2-core machine: about 20 s)."""
    rank_results = launch_ranks(WORKER, ["2x2", str(qwen2_dirs[True]), str(NUM_STEPS)], tmp_path, world_size=4,
                                timeout_s=150)
    results = [r["2x2"] for r in rank_results]
    assert sorted((r["info"].pp_rank, r["info"].tp_rank) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert_trains_like_tp1(results, tp1_training, AutoConfig.from_pretrained(qwen2_dirs[True]),
                           load_hf_state(qwen2_dirs[True]))


def test_distributed_optimizer_reload_workaround_target_still_exists() -> None:
    """checkpoint/distributed.py replaces the copy loop of this method while loading (DESIGN.md 9-10)."""
    import importlib.util

    from megatron_rl.checkpoint.distributed import DISTRIB_OPTIMIZER_RELOAD_TARGET

    module_name, class_name, pattern = DISTRIB_OPTIMIZER_RELOAD_TARGET
    source = Path(importlib.util.find_spec(module_name).origin).read_text()
    assert f"class {class_name}(" in source
    assert "def _set_main_param_and_optimizer_states(" in source and pattern in source
    assert "def _init_optimizer_states_with_dummy_values(" in source


@pytest.mark.parametrize(("layout", "saved"), [("2x1", "2x1"), ("1x1", "1x1"), ("1x2", "2x1")],
                         ids=["tp2-from-tp2", "dp2-distopt-from-dp2", "pp2-from-tp2"])
def test_resumed_step_equals_the_uninterrupted_one(layout, saved, two_rank_training) -> None:
    """A checkpoint saved after step 1 (model + Adam state + iteration), loaded into fresh models, gives
    step 2 of the run that went on: exactly at the same layout, to fp32 reduction order at another."""
    resumed = [rank_results[f"resume-{layout}"] for rank_results in two_rank_training]
    continued = [rank_results[saved] for rank_results in two_rank_training]
    assert [r["iteration"] for r in resumed] == [1, 1]
    got, want = resumed[0]["metrics"][0], continued[0]["metrics"][1]
    if layout == saved:
        assert got == want  # bit for bit: losses, clip fractions, KL, grad norm
        for rank in range(2):
            assert all(torch.equal(resumed[rank]["params"][n], continued[rank]["params"][n])
                       for n in continued[rank]["params"])
    else:  # TP=2 -> PP=2 moves row-parallel sums to one process: fp32 reduction order only
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-5)
        torch.testing.assert_close(resumed[0]["logprobs"], continued[0]["logprobs"], atol=5e-5, rtol=1e-5)


def test_tp2_checkpoint_resumes_at_tp1(qwen2_dirs, world1, tp1_training, two_rank_training, two_rank_dir) -> None:
    """The TP=2 checkpoint (saved by the 2-process run) loads into one process at TP=1 and its step 2
    equals the uninterrupted TP=1 run's step 2 within the cross-layout tolerances above."""
    ckpt_dir = two_rank_dir / "ckpt_2x1"
    assert ckpt_dir.is_dir(), ckpt_dir
    resumed = run_training(qwen2_dirs[True], world1, num_steps=1, load_from=ckpt_dir)
    assert resumed["iteration"] == 1
    got, want = resumed["metrics"][0], tp1_training["metrics"][1]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-5)
    torch.testing.assert_close(resumed["logprobs"], tp1_training["logprobs"], atol=5e-5, rtol=1e-5)
