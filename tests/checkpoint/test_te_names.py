"""Transformer Engine parameter names in the checkpoint map and the converters.

The TE names come from Megatron-Core's own local-to-TE key map (the local spec's
``sharded_state_dict_keys_map``); these tests check them against what Megatron itself does with that map
(the keys of a real local model's ``sharded_state_dict()``), and run loading, the in-memory and the
streaming converters on a model whose parameters carry TE names. Transformer Engine needs CUDA, so that
model is a CPU stand-in (``_te_standin.present_under_te_names``: a local model whose parameters are moved
to the modules Megatron's sharded state dict names, see its docstring); the GPU test in
tests/megatron/test_model.py compares a real TE model with the map.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import launch_ranks, load_hf_state
from _te_standin import present_under_te_names
from transformers import AutoConfig

from megatron_rl.checkpoint import convert, qwen2
from megatron_rl.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_rl.checkpoint.megatron_io import CheckpointReader
from megatron_rl.megatron.model import build_gpt_model

HERE = Path(__file__).resolve().parent
VARIANTS = ("qwen2_tied", "qwen2_untied", "llama")
STAGES = ((1, 0), (2, 0), (2, 1))  # (pp_size, pp_rank)


@pytest.fixture(scope="module")
def world():
    with convert.one_process_world():
        yield


@pytest.fixture(scope="module")
def pp2_stages(hf_models, tmp_path_factory) -> dict[tuple[str, int], dict]:
    """(variant, pp_rank) -> the names and sharded-state-dict keys of that stage of a PP=2 model (built in a
    real 2-rank world by _te_names_worker.py: the tied last stage needs one)."""
    out = tmp_path_factory.mktemp("te_names")
    ranks = launch_ranks(HERE / "_te_names_worker.py", [f"{v}={hf_models[v]}" for v in VARIANTS], out, 2,
                         timeout_s=300)
    return {(variant, result[variant]["pp_rank"]): result[variant] for result in ranks for variant in VARIANTS}


def _stage(hf_models, pp2_stages, variant: str, pp: int, rank: int) -> tuple[list[str], dict[str, str]]:
    """A stage's parameter names and their keys in Megatron's sharded state dict."""
    if pp == 2:
        return pp2_stages[(variant, rank)]["names"], pp2_stages[(variant, rank)]["keys"]
    with convert.one_process_world():
        model = build_gpt_model(AutoConfig.from_pretrained(hf_models[variant]))
        sharded = model.sharded_state_dict()
        names = [name for name, _ in model.named_parameters()]
        return names, {name: sharded[name].key for name in names}


def test_te_key_map_is_megatron_cores_by_hand() -> None:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    megatron_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert qwen2.te_layer_key_map() == megatron_map
    assert qwen2.te_layer_name("input_layernorm.weight") == "self_attention.linear_qkv.layer_norm_weight"
    assert qwen2.te_layer_name("pre_mlp_layernorm.weight") == "mlp.linear_fc1.layer_norm_weight"
    assert (qwen2.te_param_name("decoder.layers.7.pre_mlp_layernorm.weight")
            == "decoder.layers.7.mlp.linear_fc1.layer_norm_weight")
    for same in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight"):
        assert qwen2.te_layer_name(same) == same
    assert qwen2.te_param_name("decoder.final_layernorm.weight") == "decoder.final_layernorm.weight"


@pytest.mark.parametrize(("pp", "rank"), STAGES, ids=[f"pp{p}-stage{r}" for p, r in STAGES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_local_name_round_trips_through_megatron_key_map(hf_models, pp2_stages, variant, pp, rank) -> None:
    """Per stage of a real local-spec model: the map's local names are the model's; each one's TE name is
    the key Megatron stores it under (layer index aside), maps back to it, and the map's TE names are
    exactly these."""
    config = AutoConfig.from_pretrained(hf_models[variant])
    local, keys = _stage(hf_models, pp2_stages, variant, pp, rank)
    assert sorted(local) == sorted(qwen2.megatron_param_names(config, rank, pp))
    te = qwen2.megatron_param_names(config, rank, pp, layer_spec="te")
    assert sorted(te) == sorted(qwen2.te_param_name(name) for name in local)
    renamed = 0
    for name in local:
        te_name = qwen2.te_param_name(name)
        assert qwen2.local_param_name(te_name) == name
        if name.startswith("decoder.layers."):
            layer_free = "decoder.layers." + te_name.split(".", 3)[3]
            assert keys[name] == layer_free, name
            renamed += te_name != name
        else:
            assert te_name == name
    assert renamed == 2 * len({n.split(".")[2] for n in local if n.startswith("decoder.layers.")})  # 2 norms a layer
    assert (qwen2.layer_spec_of(local), qwen2.layer_spec_of(te)) == ("local", "te")


def test_unknown_or_mixed_names_raise_naming_them(hf_models) -> None:
    config = AutoConfig.from_pretrained(hf_models["qwen2_untied"])
    hf = load_hf_state(hf_models["qwen2_untied"])
    te = qwen2.megatron_param_names(config, layer_spec="te")
    bias = "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias"  # TE's LayerNorm (not RMSNorm) has one
    with pytest.raises(KeyError, match=bias):
        qwen2.hf_to_megatron_shard(hf, config, megatron_names=[*te, bias])
    mixed = [qwen2.local_param_name(n) if n.startswith("decoder.layers.1.self_attention") else n for n in te]
    with pytest.raises(KeyError, match=r"decoder\.layers\.1\.input_layernorm\.weight"):
        qwen2.hf_to_megatron_shard(hf, config, megatron_names=mixed)
    with pytest.raises(ValueError, match="layer_spec='auto' is not a parameter naming"):
        qwen2.hf_to_megatron_shard(hf, config, layer_spec="auto")
    shard = qwen2.hf_to_megatron_shard(hf, config, layer_spec="te")
    with pytest.raises(KeyError, match=r"decoder\.layers\.0\.mlp\.linear_fc1\.layer_norm_bias"):
        qwen2.megatron_shards_to_hf([[{**shard, "decoder.layers.0.mlp.linear_fc1.layer_norm_bias": torch.zeros(1)}]],
                                    config)
    # Extra state (Megatron's None, TE's uint8 FP8 metadata) is not a weight: skipped, never an error.
    extra = {"decoder.layers.0.self_attention.linear_qkv._extra_state": torch.zeros(5, dtype=torch.uint8),
             "decoder.final_layernorm._extra_state": None}
    back = qwen2.megatron_shards_to_hf([[{**shard, **extra}]], config)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_in_memory_round_trip_with_te_names_is_bit_exact(hf_models, variant, tp, pp) -> None:
    config = AutoConfig.from_pretrained(hf_models[variant])
    hf = load_hf_state(hf_models[variant])
    shards = [[qwen2.hf_to_megatron_shard(hf, config, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, layer_spec="te")
               for t in range(tp)] for p in range(pp)]
    local = [[qwen2.hf_to_megatron_shard(hf, config, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp)
              for t in range(tp)] for p in range(pp)]
    for te_stage, local_stage in zip(shards, local, strict=True):
        for te_shard, local_shard in zip(te_stage, local_stage, strict=True):
            assert sorted(te_shard) == sorted(qwen2.te_param_name(n) for n in local_shard)
            assert all(torch.equal(te_shard[qwen2.te_param_name(n)], t) for n, t in local_shard.items())
    back = qwen2.megatron_shards_to_hf(shards, config)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_weights_load_into_a_te_named_model(hf_models, world, variant) -> None:
    """CPU stand-in for a TE model: load_hf_into_model fills it through its TE names, and it computes the
    local model's logits bit for bit (same weights, same kernels)."""
    path = hf_models[variant]
    config, hf = AutoConfig.from_pretrained(path), load_hf_state(path)
    local = build_gpt_model(config)
    qwen2.load_hf_into_model(local, hf, config, tp_rank=0, tp_size=1)
    te = present_under_te_names(build_gpt_model(config))
    te_params = dict(te.named_parameters())
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te_params
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te_params)
    qwen2.load_hf_into_model(te, hf, config, tp_rank=0, tp_size=1)
    for name, param in local.named_parameters():
        assert torch.equal(te_params[qwen2.te_param_name(name)], param), name
    assert torch.equal(te_params["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"],
                       hf["model.layers.0.input_layernorm.weight"])
    ids = torch.arange(24).reshape(2, 12) * 37 % config.vocab_size
    positions = torch.arange(12).expand_as(ids)
    with torch.no_grad():
        assert torch.equal(te.eval()(ids, positions, None), local.eval()(ids, positions, None))


@pytest.mark.parametrize("variant", ["qwen2_tied", "llama"])
def test_streaming_converters_and_checkpoints_with_te_names(hf_models, world, tmp_path, variant) -> None:
    """HF -> Megatron checkpoint (TP=2 x PP=2) -> a TE-named model (whose final norm carries a tensor extra
    state the converted checkpoint lacks) -> saved by Megatron -> HF again: bit-exact; the saved checkpoint
    also loads into a local-spec model."""
    from megatron_rl.checkpoint.distributed import load_checkpoint, save_checkpoint

    path = tmp_path / "mcore"
    config, hf = AutoConfig.from_pretrained(hf_models[variant]), load_hf_state(hf_models[variant])
    hf_to_megatron(hf_models[variant], path, tp=2, pp=2)
    assert not any("final_layernorm" in key for key in CheckpointReader(path).object_keys())
    te = present_under_te_names(build_gpt_model(config))
    assert isinstance(te.state_dict()["decoder.final_layernorm._extra_state"], torch.Tensor)
    assert load_checkpoint(path, te) == 0
    want = qwen2.hf_to_megatron_shard(hf, config, layer_spec="te")
    params = dict(te.named_parameters())
    assert sorted(params) == sorted(want) and all(torch.equal(params[n], want[n]) for n in want)
    back = qwen2.megatron_shards_to_hf([[te.state_dict()]], config)  # tensor and None extra states skipped
    assert sorted(back) == sorted(hf) and all(torch.equal(back[n], hf[n]) for n in hf)

    save_checkpoint(tmp_path / "saved", te, None, iteration=3)
    assert "decoder.final_layernorm._extra_state/shard_0_1" in CheckpointReader(tmp_path / "saved").object_keys()
    megatron_to_hf(tmp_path / "saved", tmp_path / "hf", hf_config_from=hf_models[variant])
    exported = load_hf_state(tmp_path / "hf")
    assert sorted(exported) == sorted(hf) and all(torch.equal(exported[n], hf[n]) for n in hf)
    local = build_gpt_model(config)
    assert load_checkpoint(tmp_path / "saved", local, load_rng=False) == 3
    for name, param in local.named_parameters():
        assert torch.equal(param, params[qwen2.te_param_name(name)]), name


def test_model_layer_spec_config_field() -> None:
    from megatron_rl.trainer.config import ModelConfig

    assert ModelConfig(path="tiny").layer_spec == "auto"
    assert ModelConfig(path="tiny", layer_spec="te").layer_spec == "te"
    with pytest.raises(ValueError, match=r"model\.layer_spec='fused' is not allowed; choose one of 'auto', 'local'"):
        ModelConfig(path="tiny", layer_spec="fused")
