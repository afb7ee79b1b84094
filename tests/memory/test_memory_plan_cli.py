"""``megatron-rl plan``: the shipped recipes fit their GPUs with 10% headroom, a 7B run on one 80 GB GPU
without recompute does not (exit 3, the largest items named); the JSON; the start-up check; formulas
checked by hand. Model directories hold only config.json, with the published shapes of
Qwen2.5-3B-Instruct and Qwen2.5-7B-Instruct (huggingface.co/Qwen/*/blob/main/config.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
         "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False}
QWEN25_3B = {**QWEN2, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
QWEN25_7B = {**QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
H100_GIB = 85_017_493_504 / (1 << 30)  # what torch.cuda.mem_get_info reports as total on an H100 80GB: 79.2 GiB


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for name, config in (("3b", QWEN25_3B), ("7b", QWEN25_7B)):
        path = tmp_path_factory.mktemp(f"qwen25_{name}")
        (path / "config.json").write_text(json.dumps(config))
        dirs[name] = path
    return dirs


def _plan(capsys, *args: str) -> tuple[int, str]:
    from megatron_rl.cli import main

    code = main(["plan", *args])
    return code, capsys.readouterr().out


@pytest.mark.parametrize(("recipe", "model", "gpus"), [("medu1_qwen2.5_3b.yaml", "3b", 4),
                                                      ("medu1_qwen2.5_7b.yaml", "7b", 8)])
def test_recipes_fit_with_headroom(recipe, model, gpus, qwen_dirs, capsys) -> None:
    """On 80 GB GPUs (the 79.2 GiB torch reports on an H100 80GB), with at least 10% to spare."""
    code, out = _plan(capsys, str(ROOT / "examples" / recipe), "--gpus", str(gpus), "--gpu-memory-gib",
                      str(H100_GIB), "--json", f"model.path={qwen_dirs[model]}")
    plan = json.loads(out)
    assert code == 0 and plan["fits"], out
    assert plan["headroom"] >= 0.10, f"{recipe}: peak {plan['peak_bytes'] / (1 << 30):.1f} GiB ({plan['peak_phase']})"
    assert plan["settings"]["recompute"].startswith("full") and plan["settings"]["distributed_optimizer"]


def test_7b_on_one_gpu_without_recompute_does_not_fit(qwen_dirs, capsys) -> None:
    code, out = _plan(capsys, str(ROOT / "examples" / "medu1_qwen2.5_7b.yaml"), "--gpus", "1", "--gpu-memory-gib",
                      "80", f"model.path={qwen_dirs['7b']}", "parallel.tp=1", "model.recompute=none")
    assert code == 3
    assert "DOES NOT FIT" in out and "the memory plan does not fit" in out
    largest = re.search(r"Largest items: (.*)\.\n", out).group(1).split(", ")
    assert largest[0].startswith("activations ") and any(item.startswith("optimizer ") for item in largest)
    assert "model.recompute=full" in out


def test_json_has_the_items(qwen_dirs, capsys) -> None:
    code, out = _plan(capsys, str(ROOT / "examples" / "medu1_qwen2.5_3b.yaml"), "--gpus", "4", "--json",
                      f"model.path={qwen_dirs['3b']}", "model.recompute=none")
    plan = json.loads(out)
    assert code == 3 and plan["fits"] is False
    assert {"params", "grads", "optimizer", "activations", "engine"} <= set(plan["items"])
    assert plan["gpu_bytes"] == 80 << 30 and plan["peak_bytes"] == sum(plan["items"].values())
    assert plan["peak_phase"] in plan["phases"] and set(plan["phases"]) >= {"generate", "logprob", "update", "sync"}
    # 3.09 B parameters (the tied 151,936 x 2048 embedding, a multiple of 128 rows: no padding), bf16
    assert plan["items"]["params"] == 2 * (151936 * 2048 + 36 * 77_076_992 + 2048)


def test_engine_only_on_the_generating_ranks(qwen_dirs) -> None:
    """TP=2: the rank that feeds the engine holds it (and the sync buffers), its TP peer neither."""
    from megatron_rl.config import load_config
    from megatron_rl.memory import hf_config_for, plan_run

    cfg = load_config(ROOT / "examples" / "medu1_qwen2.5_7b.yaml", [f"model.path={qwen_dirs['7b']}"])
    plan = plan_run(cfg, hf_config_for(cfg), num_gpus=8, device="gpu")
    assert set(plan.ranks) == {"stage 0, engine", "stage 0"}
    assert plan.ranks["stage 0"]["generate"]["engine"] == 0 == plan.ranks["stage 0"]["sync"]["sync_buffers"]
    assert plan.ranks["stage 0, engine"]["generate"]["engine"] == int(cfg.rollout.gpu_memory_utilization * (80 << 30))


def test_cpu_plan_adds_up_the_hosts_ranks(capsys) -> None:
    from megatron_rl.config import load_config
    from megatron_rl.memory import hf_config_for, plan_run
    from megatron_rl.memory.plan import CPU_ALLOCATOR_SLACK, CPU_PROCESS_BASELINE_BYTES

    cfg = load_config(ROOT / "examples" / "quickstart.yaml", [])
    one = plan_run(cfg, hf_config_for(cfg), num_gpus=1, device="cpu", device_bytes=64 << 30)
    two = plan_run(cfg, hf_config_for(cfg), num_gpus=2, device="cpu", device_bytes=64 << 30)
    for plan, ranks in ((one, 1), (two, 2)):  # per rank: the process baseline + the allocator's slack on the rest
        rest = sum(b for item, b in plan.items.items() if item != "runtime")
        assert plan.items["runtime"] - ranks * CPU_PROCESS_BASELINE_BYTES == pytest.approx(CPU_ALLOCATOR_SLACK * rest,
                                                                                          abs=ranks)
    assert two.items["params"] == 2 * one.items["params"] and two.items["engine"] == 2 * one.items["engine"]
    code, out = _plan(capsys, str(ROOT / "examples" / "quickstart.yaml"), "--gpus", "1", "--device", "cpu",
                      "--gpu-memory-gib", "0.5")
    assert code == 3 and "engine" in out.split("Largest items: ")[1] and "rollout.kv_cache_gib" in out


def test_start_check_refuses_or_returns_the_plan() -> None:
    """On CPU, against memory.device_memory_gib (else the available RAM); no process group needed (the
    trainer checks before init_parallel builds anything)."""
    from megatron_rl.config import load_config
    from megatron_rl.memory import InsufficientMemoryError, check_run_fits, hf_config_for

    cfg = load_config(ROOT / "examples" / "quickstart.yaml", ["memory.device_memory_gib=0.5"])
    with pytest.raises(InsufficientMemoryError, match="the memory plan does not fit") as refused:
        check_run_fits(cfg, hf_config_for(cfg), world_size=1, local_world_size=1)
    assert refused.value.plan.fits is False and isinstance(refused.value, RuntimeError)
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", ["memory.device_memory_gib=0.5", "memory.check=false"])
    assert check_run_fits(cfg, hf_config_for(cfg), world_size=1, local_world_size=1).fits is False
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", ["memory.device_memory_gib=64"])
    assert check_run_fits(cfg, hf_config_for(cfg), world_size=1, local_world_size=1).fits


def test_offload_optimizer_auto_turns_on_only_when_needed(qwen_dirs) -> None:
    from megatron_rl.config import load_config
    from megatron_rl.memory import hf_config_for, plan_run

    overrides = [f"model.path={qwen_dirs['3b']}", "model.recompute=full", "algorithm.micro_batch_size=1",
                 "optim.use_distributed_optimizer=true"]
    cfg = load_config(ROOT / "examples" / "medu1_qwen2.5_3b.yaml", overrides)
    roomy = plan_run(cfg, hf_config_for(cfg), num_gpus=4, device="gpu", device_bytes=200 << 30)
    assert roomy.fits and not roomy.offload_optimizer
    cfg = load_config(ROOT / "examples" / "medu1_qwen2.5_3b.yaml", [*overrides, "rollout.gpu_memory_utilization=0.85"])
    tight = plan_run(cfg, hf_config_for(cfg), num_gpus=4, device="gpu", device_bytes=80 << 30)
    assert tight.offload_optimizer  # the engine's 68 GiB leaves no room for the optimizer while it generates
    assert tight.phases["generate"]["optimizer"] == 0 == tight.phases["generate"]["grads"]
    assert tight.phases["update"]["optimizer"] > 0


def test_buffer_layout_by_hand() -> None:
    """Megatron DDP's buffer with the distributed optimizer at DP=2: parameters in reverse order, each
    starting at a multiple of 64, the end padded to lcm(2, 128) = 128. Params of 100 and 10 elements:
    the 10 at [0, 10), the 100 at [64, 164), total 256; rank 0's shard [0, 128) covers 10 + 64 = 74
    elements, rank 1's [128, 256) covers 36: the plan takes 74."""
    from megatron_rl.memory.plan import _buffer_layout, _shard_numel

    total, ranges = _buffer_layout([(100, False), (10, False)], distributed=True, dp=2)
    assert (total, ranges) == (256, [(0, 10), (64, 164)])
    assert _shard_numel(ranges, total, 2) == 74
    assert _buffer_layout([(100, False), (10, False)], distributed=False, dp=2) == (110, [(0, 10), (10, 110)])


def test_layer_activations_by_hand() -> None:
    """The tiny model's layer (h 128, 4 heads of 32, 2 KV heads, ffn 256), one sequence of 16 tokens, fp32
    on CPU, no recompute (the count measured with saved_tensors_hooks for this shape was 176,512 bytes):
    16 x (6 x 128 + 128 + 5 x 256 + 3 x 128) x 4 = 163,840 (norms, context, MLP, batched q/k/v)
    + 16 x 8 = 128 (1/rms twice) + 16 x 16 x 4 x 4 = 4,096 (probabilities) + 16 x 16 = 256 (mask)
    + 4 x 16 x 32 x 4 = 8,192 (RoPE cos / sin) = 176,512."""
    from megatron_rl.megatron.model import GPTShape
    from megatron_rl.memory.plan import _Dims, layer_activation_bytes
    from transformers import Qwen2Config

    shape = GPTShape.from_hf(Qwen2Config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=1024))
    dims = _Dims(shape, tp=1, pp=1)
    assert layer_activation_bytes(dims, tokens=16, seq=16, layer_spec="local", recompute="none", act_bytes=4,
                                  gpu=False) == 176_512
    # selective: minus probabilities, mask and the three batched copies (4,096 + 256 + 24,576), plus q
    # (128), k (64) and the fused QKV output (256) per token: 16 x 448 x 4 = 28,672
    assert layer_activation_bytes(dims, tokens=16, seq=16, layer_spec="local", recompute="selective", act_bytes=4,
                                  gpu=False) == 176_512 - 28_928 + 28_672
