"""GPTModel from an HF config: the TransformerConfig it gets, vocab padding, unsupported configs."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from megatron_rl.checkpoint import qwen2
from megatron_rl.megatron import model as model_module
from megatron_rl.megatron.model import (
    GPTShape,
    build_gpt_model,
    padded_vocab_size,
    place_model,
    resolve_layer_spec,
    transformer_config_from_hf,
)


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
    model = build_gpt_model(hf, layer_spec="local")
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(qwen2.megatron_param_names(hf))
    assert params["embedding.word_embeddings.weight"].shape == (1152, 128)  # 1030 padded to 9 * 128
    assert model.hf_vocab_size == 1030
    assert model.share_embeddings_and_output_weights == (variant == "qwen2-tied")
    assert model.layer_spec == "local"


def test_place_model_casts_the_local_norms_megatron_builds_in_fp32(qwen2_dirs, world1) -> None:
    """What build_gpt_model does on CUDA, checked on the CPU device: with bf16 parameters Megatron builds
    the linear layers in bf16 but the local spec's torch RMSNorm in fp32; place_model leaves no fp32
    floating-point tensor behind (the bf16 optimizer refuses one) and keeps the weights' values."""
    hf = AutoConfig.from_pretrained(qwen2_dirs[True])
    model = build_gpt_model(hf, layer_spec="local", params_dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["decoder.layers.0.input_layernorm.weight"] == torch.float32  # what Megatron builds
    assert dtypes["decoder.layers.0.self_attention.linear_qkv.weight"] == torch.bfloat16
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert place_model(model, torch.bfloat16, torch.device("cpu")) is model
    after = dict(model.named_parameters())
    assert {p.dtype for p in after.values()} == {torch.bfloat16}
    for name, value in before.items():
        assert torch.equal(after[name].float(), value.to(torch.bfloat16).float()), name


def test_auto_layer_spec_follows_transformer_engine_availability(monkeypatch) -> None:
    monkeypatch.setattr(model_module, "transformer_engine_usable", lambda: (True, ""))
    assert resolve_layer_spec("auto") == "te" and resolve_layer_spec("te") == "te"
    monkeypatch.setattr(model_module, "transformer_engine_usable", lambda: (False, "CUDA is not available"))
    assert resolve_layer_spec("auto") == "local" and resolve_layer_spec("local") == "local"


def test_unknown_layer_spec_is_named() -> None:
    with pytest.raises(ValueError, match=r"layer_spec='fused'; allowed: auto, local, te"):
        resolve_layer_spec("fused")


def test_te_layer_spec_without_cuda_is_a_clear_error(qwen2_dirs, monkeypatch) -> None:
    # Whatever this machine has, with CUDA reported absent "te" must refuse and say why.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"layer_spec='te' needs Transformer Engine on a CUDA device: "
                                         r"CUDA is not available"):
        build_gpt_model(AutoConfig.from_pretrained(qwen2_dirs[True]), layer_spec="te")


@pytest.mark.gpu
def test_te_model_matches_the_local_model(qwen2_dirs, world1) -> None:
    """A real Transformer Engine model has exactly the map's TE names, loads the HF weights through them
    (load_hf_into_model, the trainer's path) and gives the local model's logprobs."""
    from megatron_rl.megatron.forward import forward_logprobs

    hf = AutoConfig.from_pretrained(qwen2_dirs[False])
    state = _hf_state(qwen2_dirs[False])
    local = build_gpt_model(hf, layer_spec="local")
    qwen2.load_hf_into_model(local, state, hf, tp_rank=0, tp_size=1)
    te = build_gpt_model(hf, layer_spec="te")
    assert te.layer_spec == "te" and resolve_layer_spec("auto") == "te"
    te_names = [name for name, _ in te.named_parameters()]
    assert sorted(te_names) == sorted(qwen2.megatron_param_names(hf, layer_spec="te"))
    assert qwen2.layer_spec_of(te_names) == "te"
    qwen2.load_hf_into_model(te, state, hf, tp_rank=0, tp_size=1)
    te_params = dict(te.named_parameters())
    for name, param in local.named_parameters():
        assert torch.equal(te_params[qwen2.te_param_name(name)], param), name
    ids = torch.randint(0, hf.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    local_logprobs = forward_logprobs(local.eval(), ids, vocab_size=hf.vocab_size).logprobs
    te_logprobs = forward_logprobs(te.eval(), ids, vocab_size=hf.vocab_size).logprobs
    torch.testing.assert_close(te_logprobs, local_logprobs, atol=1e-3, rtol=0)  # TE's fp32 GEMMs may use TF32
    # The state dict a TE model saves converts back to the HF weights (its _extra_state entries skipped).
    back = qwen2.megatron_shards_to_hf([[te.state_dict()]], hf)
    assert sorted(back) == sorted(state) and all(torch.equal(back[n].cpu(), state[n]) for n in state)


@pytest.mark.gpu
def test_compare_layer_specs(qwen2_dirs, world1) -> None:
    diff = model_module.compare_layer_specs(qwen2_dirs[True])
    assert 0 <= diff < 1e-2, diff


def test_compare_layer_specs_without_transformer_engine_says_why(qwen2_dirs, monkeypatch) -> None:
    monkeypatch.setattr(model_module, "transformer_engine_usable", lambda: (False, "CUDA is not available"))
    with pytest.raises(ValueError, match=r"layer_spec='te' needs Transformer Engine on a CUDA device: CUDA is not"):
        model_module.compare_layer_specs(qwen2_dirs[True])


def _hf_state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))
