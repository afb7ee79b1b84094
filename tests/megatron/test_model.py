"""GPTModel from an HF config: the TransformerConfig it gets, vocab padding, unsupported configs."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from megatron_rl.checkpoint import qwen2
from megatron_rl.megatron.model import GPTShape, build_gpt_model, padded_vocab_size, transformer_config_from_hf


def test_padded_vocab_size_by_hand() -> None:
    assert padded_vocab_size(1030, 128, 1) == 1152  # 9 * 128
    assert padded_vocab_size(1030, 128, 2) == 1280  # 5 * 256
    assert padded_vocab_size(1024, 128, 2) == 1024  # already a multiple
    assert padded_vocab_size(151936, 128, 1) == 151936  # Qwen2.5's 151936 = 1187 * 128
    assert padded_vocab_size(151936, 128, 4) == 152064  # 151936 / 512 = 296.75 -> 297 * 512


def test_transformer_config_matches_qwen2(qwen2_dirs) -> None:
    hf = AutoConfig.from_pretrained(qwen2_dirs[True])
    config = transformer_config_from_hf(hf)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.num_query_groups,
            config.kv_channels, config.ffn_hidden_size) == (2, 128, 4, 2, 32, 256)
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == hf.rms_norm_eps
    assert config.gated_linear_unit and config.activation_func is F.silu
    assert config.add_qkv_bias and not config.add_bias_linear
    assert config.params_dtype == torch.float32 and config.hidden_dropout == 0 and config.attention_dropout == 0
    assert not (config.gradient_accumulation_fusion or config.apply_rope_fusion or config.persist_layer_norm)
    assert config.use_cpu_initialization == (not torch.cuda.is_available())
    assert GPTShape.from_hf(hf).rope_theta == 1e6


def test_llama_has_no_qkv_bias(llama_dir) -> None:
    config = transformer_config_from_hf(AutoConfig.from_pretrained(llama_dir))
    assert not config.add_qkv_bias and config.num_query_groups == 2


def test_unknown_model_type_is_named() -> None:
    with pytest.raises(ValueError, match=r"model_type='mistral' is not supported; known: llama, qwen2"):
        GPTShape.from_hf(types.SimpleNamespace(model_type="mistral"))


@pytest.mark.parametrize("variant", ["qwen2-tied", "qwen2-untied", "llama"])
def test_built_model_has_the_converter_names_and_padded_vocab(variant, qwen2_dirs, llama_dir, world1) -> None:
    path = {"qwen2-tied": qwen2_dirs[True], "qwen2-untied": qwen2_dirs[False], "llama": llama_dir}[variant]
    hf = AutoConfig.from_pretrained(path)
    model = build_gpt_model(hf)
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(qwen2.megatron_param_names(hf))
    assert params["embedding.word_embeddings.weight"].shape == (1152, 128)  # 1030 padded to 9 * 128
    assert model.hf_vocab_size == 1030
    assert model.share_embeddings_and_output_weights == (variant == "qwen2-tied")
