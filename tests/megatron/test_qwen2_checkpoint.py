"""HF <-> Megatron conversion: hand-checked fused layouts, bit-exact round trips, loud name errors."""

from __future__ import annotations

import types

import pytest
import torch
from _helpers import load_hf_state
from transformers import AutoConfig

from megatron_rl.checkpoint import llama, qwen2
from megatron_rl.megatron.model import padded_vocab_size


def shape_config(**overrides):
    """A duck-typed HF config: 4 query heads of dim 1, 2 KV groups, hidden 4, ffn 4, vocab 5."""
    values = {
        "model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 1, "intermediate_size": 4, "vocab_size": 5,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 16,
        "hidden_act": "silu",
    }
    values.update(overrides)
    return types.SimpleNamespace(**values)


def numbered_hf_state(config) -> dict[str, torch.Tensor]:
    """Every HF tensor filled with distinct numbers (row r of q_proj = 100 + r, etc.), per layer offset."""
    H, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    state = {"model.embed_tokens.weight": torch.arange(V * H, dtype=torch.float32).reshape(V, H),
             "model.norm.weight": torch.arange(H, dtype=torch.float32)}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = -torch.arange(V * H, dtype=torch.float32).reshape(V, H)
    for i in range(L):
        p, base = f"model.layers.{i}.", 1000.0 * i

        def rows(start, n, cols, _base=base):
            return (_base + start + torch.arange(n, dtype=torch.float32)).repeat_interleave(cols).reshape(n, cols)

        def vector(start, n, _base=base):
            return _base + start + torch.arange(n, dtype=torch.float32)

        state.update({
            p + "input_layernorm.weight": vector(0, H),
            p + "post_attention_layernorm.weight": vector(10, H),
            p + "self_attn.q_proj.weight": rows(100, q, H), p + "self_attn.q_proj.bias": vector(100, q),
            p + "self_attn.k_proj.weight": rows(200, kv, H), p + "self_attn.k_proj.bias": vector(200, kv),
            p + "self_attn.v_proj.weight": rows(300, kv, H), p + "self_attn.v_proj.bias": vector(300, kv),
            p + "self_attn.o_proj.weight": base + torch.arange(H * q, dtype=torch.float32).reshape(H, q),
            p + "mlp.gate_proj.weight": rows(400, F, H), p + "mlp.up_proj.weight": rows(500, F, H),
            p + "mlp.down_proj.weight": base + torch.arange(H * F, dtype=torch.float32).reshape(H, F),
        })
    return state


def test_qkv_and_fc1_layouts_by_hand() -> None:
    config = shape_config()
    hf = numbered_hf_state(config)
    shards = [qwen2.hf_to_megatron_shard(hf, config, tp_rank=r, tp_size=2, make_vocab_size_divisible_by=2)
              for r in range(2)]
    # q rows 100..103 (2 heads per group, head_dim 1), k rows 200..201, v rows 300..301.
    # Per group g: [q heads 2g, 2g+1; k g; v g]; TP rank r holds group r.
    assert shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist() == [100, 101, 200, 300]
    assert shards[1]["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist() == [102, 103, 201, 301]
    assert shards[1]["decoder.layers.1.self_attention.linear_qkv.bias"].tolist() == [1102, 1103, 1201, 1301]
    # gate rows 400..403, up rows 500..503; rank r: [gate shard r; up shard r].
    assert shards[0]["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == [400, 401, 500, 501]
    assert shards[1]["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == [402, 403, 502, 503]
    # o_proj / down_proj split on the input dim (columns).
    assert torch.equal(shards[1]["decoder.layers.0.self_attention.linear_proj.weight"],
                       hf["model.layers.0.self_attn.o_proj.weight"][:, 2:])
    # Vocab 5 padded to a multiple of 2 * 2 = 4 -> 8 rows, 4 per rank; rows 5..7 are zero.
    emb = shards[1]["embedding.word_embeddings.weight"]
    assert emb.shape == (4, 4) and torch.equal(emb[0], hf["model.embed_tokens.weight"][4])
    assert not emb[1:].any()
    assert "output_layer.weight" not in shards[0]  # tied


def all_shards(hf, config, tp, pp, divisor=2):
    return [[qwen2.hf_to_megatron_shard(hf, config, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp,
                                        make_vocab_size_divisible_by=divisor) for t in range(tp)]
            for p in range(pp)]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_is_bit_exact_numbered(tied, tp, pp) -> None:
    config = shape_config(tie_word_embeddings=tied)
    hf = numbered_hf_state(config)
    back = qwen2.megatron_shards_to_hf(all_shards(hf, config, tp, pp), config)
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_pipeline_stages_hold_consecutive_layers() -> None:
    config = shape_config(tie_word_embeddings=False)
    hf = numbered_hf_state(config)
    first, last = (s[0] for s in all_shards(hf, config, tp=1, pp=2))
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "decoder.final_layernorm.weight" in last and "embedding.word_embeddings.weight" not in last
    # Global layer 1 is local layer 0 of stage 1.
    assert torch.equal(last["decoder.layers.0.input_layernorm.weight"], hf["model.layers.1.input_layernorm.weight"])
    assert not any(name.startswith("decoder.layers.1.") for name in last)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_real_checkpoint_bit_exact(tied, tp, qwen2_dirs) -> None:
    config = AutoConfig.from_pretrained(qwen2_dirs[tied])
    hf = load_hf_state(qwen2_dirs[tied])
    shards = all_shards(hf, config, tp, 1, divisor=128)
    vocab = padded_vocab_size(config.vocab_size, 128, tp)
    assert shards[0][0]["embedding.word_embeddings.weight"].shape[0] == vocab // tp  # 1152 or 1280 rows
    back = qwen2.megatron_shards_to_hf(shards, config)
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_llama_round_trip_has_no_qkv_bias(llama_dir) -> None:
    config = AutoConfig.from_pretrained(llama_dir)
    hf = load_hf_state(llama_dir)
    assert not any(name.endswith("q_proj.bias") for name in hf)
    names = llama.megatron_param_names(config)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in names
    back = llama.megatron_shards_to_hf(all_shards(hf, config, 2, 2), config)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_unknown_and_missing_names_raise_with_the_name() -> None:
    config = shape_config()
    hf = numbered_hf_state(config)
    with pytest.raises(KeyError, match="model.layers.0.self_attn.rotary_emb.inv_freq"):
        qwen2.hf_to_megatron_shard({**hf, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(1)}, config,
                                   make_vocab_size_divisible_by=2)
    missing = dict(hf)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        qwen2.hf_to_megatron_shard(missing, config, make_vocab_size_divisible_by=2)
    extra = [*qwen2.megatron_param_names(config), "decoder.layers.0.extra.weight"]
    with pytest.raises(KeyError, match="decoder.layers.0.extra.weight"):
        qwen2.hf_to_megatron_shard(hf, config, make_vocab_size_divisible_by=2, megatron_names=extra)
    shard = qwen2.hf_to_megatron_shard(hf, config, make_vocab_size_divisible_by=2)
    del shard["decoder.final_layernorm.weight"]
    with pytest.raises(KeyError, match="decoder.final_layernorm.weight"):
        qwen2.megatron_shards_to_hf([[shard]], config)


def test_kv_groups_that_tp_does_not_divide_evenly_are_rejected() -> None:
    """One KV head over TP=2 is Megatron's "fewer KV heads than TP" layout (tests/checkpoint covers it);
    3 KV groups over TP=2 is no layout Megatron has."""
    config = shape_config(num_attention_heads=6, num_key_value_heads=3, hidden_size=6)
    with pytest.raises(ValueError, match="num_query_groups=3"):
        qwen2.hf_to_megatron_shard(numbered_hf_state(config), config, tp_rank=0, tp_size=2)
