"""The critic (megatron_rl.megatron.critic): a GPTModel trunk with the policy's HF weights and a scalar
value head, its values, the clipped value-loss update and its checkpoint.

One process (TP=1): the values are the policy trunk's final hidden states times the head; value-loss
steps on a fixed batch lower the loss and move the weights; a checkpoint round trip is bitwise. Two
processes (gloo): TP=2, PP=2 and DP=2 (distributed optimizer) give the TP=1 values, losses and grad
norms within fp32 tolerances, and a TP=2 checkpoint resumes bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _critic_worker import CRITIC_LR, build_critic_for, critic_batch, run_critic
from _helpers import launch_ranks

WORKER = Path(__file__).resolve().parent / "_critic_worker.py"
NUM_STEPS = 2


def test_critic_config_is_validated() -> None:
    from megatron_rl.megatron.critic import CriticConfig, CriticMicroBatch, ValueLossSettings

    config = CriticConfig()
    assert config.optim.lr == 1e-5 and config.cliprange_value == 0.5 and config.warmup_steps == 0  # verl's
    with pytest.raises(ValueError, match="critic.warmup_steps"):
        CriticConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="critic.cliprange_value"):
        CriticConfig(cliprange_value=0.0)
    with pytest.raises(ValueError, match="critic.loss_agg"):
        CriticConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="critic.micro_batch_size"):
        CriticConfig(micro_batch_size=0)
    assert CriticConfig(cliprange_value=None).loss_settings() == ValueLossSettings(cliprange_value=None)
    with pytest.raises(ValueError, match=r"returns has shape \(1, 5\); expected"):
        CriticMicroBatch(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4),
                         torch.zeros(1, 5))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_values_are_the_policy_trunk_times_the_head(tied, qwen2_dirs, world1) -> None:
    """The critic holds every policy weight but the LM head, and its value at position t is
    ``w . h_t + b`` with h_t the policy's final hidden state there; the head starts at
    N(0, 1/(hidden+1)) from its seed, bias 0."""
    from _helpers import build_policy_and_reference

    from megatron_rl.megatron.critic import forward_values
    from megatron_rl.megatron.forward import stage_forward
    from megatron_rl.megatron.optim import unwrap_ddp

    critic, _optimizer, config = build_critic_for(qwen2_dirs[tied], world1)
    policy = unwrap_ddp(build_policy_and_reference(qwen2_dirs[tied], world1)[0])
    critic_params = dict(unwrap_ddp(critic).named_parameters())
    policy_params = dict(policy.named_parameters())
    trunk = sorted(n for n in critic_params if not n.startswith("output_layer."))
    assert trunk == sorted(n for n in policy_params if not n.startswith("output_layer."))
    assert all(torch.equal(critic_params[n], policy_params[n]) for n in trunk)
    head_w, head_b = critic_params["output_layer.weight"], critic_params["output_layer.bias"]
    hidden = config.hidden_size
    assert head_w.shape == (1, hidden) and head_b.shape == (1,) and head_b.item() == 0.0
    expected_w = torch.randn((1, hidden), generator=torch.Generator().manual_seed(0)) / math.sqrt(hidden + 1)
    assert torch.equal(head_w, expected_w)

    ids, mask, _returns = critic_batch(config.vocab_size)
    values = forward_values(critic, ids, mask=mask, micro_batch_size=2)
    with torch.no_grad():
        final_hidden = stage_forward(policy, ids)  # (T, b, h)
    expected = (final_hidden.transpose(0, 1)[:, :-1] @ head_w[0]).float()  # (b, T-1); + bias 0
    torch.testing.assert_close(values, torch.where(mask, expected, torch.zeros_like(expected)), atol=1e-5, rtol=1e-5)
    assert (values[~mask] == 0).all() and values[mask].abs().min() > 0
    # |final hidden| ~ sqrt(hidden) (RMS-normalised, norm weights ~1): values of order 1, not 0.
    assert 0.1 < values[mask].std() < 10


def test_value_steps_lower_the_loss_and_move_the_weights(qwen2_dirs, world1) -> None:
    result = run_critic(qwen2_dirs[True], world1, num_steps=4, cliprange_value=None)
    initial = dict(build_critic_for(qwen2_dirs[True], world1)[0].module.named_parameters())
    first = result["metrics"][0]
    # Step 1: values == old values, so the clip is inactive and vf_loss = 0.5 * mean squared error.
    assert first["vf_clip_frac"] == 0.0 and first["update_successful"] == 1.0
    _ids, mask, returns = critic_batch(1030)
    error = ((result["values0"] - returns)[mask] ** 2).mean().item()
    assert first["vf_error"] == pytest.approx(error, rel=1e-6)
    assert first["vf_loss"] == pytest.approx(error / 2, rel=1e-6)
    assert first["value_mean"] == pytest.approx(result["values0"][mask].mean().item(), rel=1e-5, abs=1e-7)
    losses = [m["vf_loss"] for m in result["metrics"]]
    # measured: 0.915, 0.514, 0.245, 0.096 (Adam at lr 1e-4 on a 4-row batch)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses
    after = ((result["values"] - returns)[mask] ** 2).mean().item()
    assert after < error  # the values moved towards the returns
    moved = {n: (result["params"][n] - initial[n]).abs().max().item() for n in initial}
    assert moved["output_layer.weight"] > CRITIC_LR and moved["output_layer.bias"] > CRITIC_LR
    assert moved["decoder.layers.0.self_attention.linear_qkv.weight"] > CRITIC_LR  # the trunk learns too
    assert moved["embedding.word_embeddings.weight"] > 0


def test_clipped_value_loss_blocks_far_moves(qwen2_dirs, world1) -> None:
    """With old values far below the returns and a small clip, every token's clipped error is the larger
    one after the first step, and the loss stops falling as the unclipped one would."""
    clipped = run_critic(qwen2_dirs[True], world1, num_steps=2, cliprange_value=1e-3)
    assert clipped["metrics"][0]["vf_clip_frac"] == 0.0
    assert clipped["metrics"][-1]["vf_clip_frac"] > 0.5


def test_checkpoint_round_trip_is_bitwise(qwen2_dirs, world1, tp1_critic, tp1_critic_dir) -> None:
    """Saved after step 1 and loaded into a fresh critic: step 2 from the loaded one (weights and Adam
    state) equals step 2 of the run that went on, bit for bit."""
    from megatron_rl.megatron.critic import CRITIC_DIR

    continued = tp1_critic
    assert (tp1_critic_dir / CRITIC_DIR / "metadata.json").is_file()
    resumed = run_critic(qwen2_dirs[True], world1, num_steps=1, load_from=tp1_critic_dir)
    assert resumed["iteration"] == 1
    assert resumed["metrics"][0] == continued["metrics"][1]
    assert torch.equal(resumed["values"], continued["values"])
    assert all(torch.equal(resumed["params"][n], continued["params"][n]) for n in continued["params"])


def test_loading_a_run_checkpoint_without_a_critic_names_it(qwen2_dirs, world1, tmp_path) -> None:
    from megatron_rl.megatron.critic import load_critic_checkpoint

    critic, optimizer, _config = build_critic_for(qwen2_dirs[True], world1)
    with pytest.raises(FileNotFoundError, match="holds no critic checkpoint"):
        load_critic_checkpoint(tmp_path, critic, optimizer)


@pytest.fixture(scope="module")
def tp1_critic_dir(tmp_path_factory) -> Path:
    """Where the TP=1 run saves its critic after step 1."""
    return tmp_path_factory.mktemp("critic_tp1")


@pytest.fixture(scope="module")
def tp1_critic(qwen2_dirs, world1, tp1_critic_dir) -> dict:
    """The TP=PP=DP=1 reference run: NUM_STEPS clipped value-loss steps, saved after the first."""
    return run_critic(qwen2_dirs[True], world1, num_steps=NUM_STEPS, save_to=tp1_critic_dir)


@pytest.fixture(scope="module")
def two_rank_critic(qwen2_dirs, tmp_path_factory) -> list[dict]:
    """TP=2, PP=2, DP=2 (distributed optimizer) and the TP=2 resume, one launch of 2 processes."""
    return launch_ranks(WORKER, ["2x1,1x2,1x1", str(qwen2_dirs[True]), str(NUM_STEPS)],
                        tmp_path_factory.mktemp("critic_two_ranks"), world_size=2, timeout_s=150)


@pytest.mark.parametrize("layout", ["2x1", "1x2", "1x1"], ids=["tp2", "pp2", "dp2-distopt"])
def test_two_ranks_give_the_tp1_values_and_losses(layout, tp1_critic, two_rank_critic) -> None:
    results = [rank[layout] for rank in two_rank_critic]
    tp, pp = (int(n) for n in layout.split("x"))
    layouts = [(r["info"].tp_size, r["info"].pp_size, r["info"].dp_size) for r in results]
    assert layouts == [(tp, pp, 2 // (tp * pp))] * 2
    assert {r["num_tokens"] for r in results} == {tp1_critic["num_tokens"]} == {22}
    for rank in results:  # every rank holds the same values and (global) metrics
        assert torch.equal(rank["values0"], results[0]["values0"]) and torch.equal(rank["values"], results[0]["values"])
        assert rank["metrics"] == results[0]["metrics"]
    # fp32 sums in another order (TP: partial matmul sums + all-reduce; DP: gradients reduce-scattered; PP:
    # the same ops in two processes). Values are of order 1; measured max |diff| 1.1e-6 at TP=2 (0 at PP=2
    # and DP=2), relative loss diff <= 1.6e-7, grad norm <= 4.6e-7: tolerances 10x those.
    torch.testing.assert_close(results[0]["values0"], tp1_critic["values0"], atol=1e-5, rtol=0)
    for got, want in zip(results[0]["metrics"], tp1_critic["metrics"], strict=True):
        assert got["vf_loss"] == pytest.approx(want["vf_loss"], rel=2e-6), (got, want)
        assert got["vf_error"] == pytest.approx(want["vf_error"], rel=2e-6), (got, want)
        assert got["vf_clip_frac"] == want["vf_clip_frac"], (got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-6), (got, want)
    # Two Adam steps (lr 1e-4) later: measured max |diff| 1.4e-6 while the values moved by up to 1.36.
    torch.testing.assert_close(results[0]["values"], tp1_critic["values"], atol=2e-5, rtol=0)
    assert (results[0]["values"] - results[0]["values0"]).abs().max() > 0.1  # the steps did move them


def test_tp2_critic_checkpoint_resumes_bitwise(two_rank_critic) -> None:
    for rank in two_rank_critic:
        resumed, continued = rank["resume-2x1"], rank["2x1"]
        assert resumed["iteration"] == 1
        assert resumed["metrics"][0] == continued["metrics"][1]
        assert torch.equal(resumed["values"], continued["values"])
        assert all(torch.equal(resumed["params"][n], continued["params"][n]) for n in continued["params"])

