"""The memory plan of PPO with a critic (``algorithm.advantage=gae``): the critic item by hand, its phase,
the offloaded case, and the Qwen2.5-3B PPO recipe on 4 x 80 GB."""

from __future__ import annotations

import json

import pytest
from test_memory_plan_cli import H100_GIB, ROOT, _plan, qwen_dirs  # noqa: F401  (qwen_dirs: a fixture)

GIB = 1 << 30


def _tiny_plan(model_dirs, *overrides: str, device: str = "cpu"):
    from megatron_rl.config import load_config
    from megatron_rl.memory.plan import hf_config_for, plan_run

    cfg = load_config(None, [f"model.path={model_dirs['tiny']}", "model.layer_spec=local", "data.batch_size=2",
                             "rollout.n=4", "algorithm.kl_coef=0", *overrides])
    return plan_run(cfg, hf_config_for(cfg), num_gpus=1, device=device, device_bytes=80 * GIB)


def test_critic_item_by_hand(model_dirs) -> None:
    """The tiny shape (hidden 128, 2 layers, 4 heads of 32, 2 KV heads, ffn 256, vocab 1024, tied): per
    layer 128 + 256*128 + 256 (qkv bias) + 128*128 + 128 + 2*256*128 + 128*256 = 147,968; the critic holds
    the embedding 1024*128 = 131,072, two layers, the final norm 128 and the head 128 + 1: 427,265
    parameters. fp32 on CPU: 4 (param) + 4 (grad) + 8 (Adam) = 16 bytes each."""
    plan = _tiny_plan(model_dirs, "algorithm.advantage=gae")
    numel = 131_072 + 2 * 147_968 + 128 + 129
    assert numel == 427_265
    assert list(plan.phases) == ["generate", "logprob", "critic", "update", "step", "sync"]
    assert {phase: items["critic"] for phase, items in plan.phases.items()} == dict.fromkeys(plan.phases, 16 * numel)
    critic_phase = plan.phases["critic"]
    assert critic_phase["activations"] > 0 and critic_phase["optimizer_step"] == 128 * 1024 * 4  # largest tensor
    assert "critic: a second model, fp32, replicated optimizer" in plan.table()


def test_no_critic_no_critic_phase(model_dirs) -> None:
    plan = _tiny_plan(model_dirs)
    assert list(plan.phases) == ["generate", "logprob", "update", "step", "sync"]
    assert all(items["critic"] == 0 for items in plan.phases.values())


def test_offloaded_critic_keeps_only_its_weights_outside_its_update(model_dirs) -> None:
    """GPU, bf16 critic, memory.offload_optimizer=on: 2 bytes per parameter outside the critic phase; in it
    2 + 4 (fp32 grad) + 12 (fp32 master + Adam) bytes."""
    plan = _tiny_plan(model_dirs, "algorithm.advantage=gae", "critic.optim.bf16=true", "memory.offload_optimizer=on",
                      device="gpu")
    numel = 427_265
    assert plan.phases["generate"]["critic"] == plan.phases["update"]["critic"] == 2 * numel
    assert plan.phases["critic"]["critic"] == (2 + 4 + 12) * numel


def test_ppo_recipe_fits_four_80gb_gpus(qwen_dirs, capsys) -> None:  # noqa: F811
    code, out = _plan(capsys, str(ROOT / "examples" / "medu1_qwen2.5_3b_ppo.yaml"), "--gpus", "4", "--gpu-memory-gib",
                      str(H100_GIB), "--json", f"model.path={qwen_dirs['3b']}")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["headroom"] >= 0.10, out
    # the critic: a second 3.09B-parameter model, 2 bytes each on the GPU outside its update
    assert plan["phases"]["generate"]["critic"] == pytest.approx(3.09e9 * 2, rel=0.01)
    assert plan["phases"]["critic"]["critic"] > 4 * plan["phases"]["generate"]["critic"]
