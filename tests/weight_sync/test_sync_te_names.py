"""The weight sync of a model whose parameters carry Transformer Engine names.

The plan of a TE-named model is the local model's with the TE names (same HF tensors, layouts, slices
and buckets). Pushes go into a recording engine and are compared bit for bit with the HF checkpoint the
model was loaded from: in this process (TP=1) and on 2 ranks (TP=2, and PP=2 where the stages agree on
their naming before they exchange shapes). Transformer Engine needs CUDA, so the model is the CPU stand-in
of tests/checkpoint/_te_standin.py (a local model presented under TE names; see its docstring).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, Qwen2Config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "megatron"))
sys.path.insert(0, str(HERE.parent / "checkpoint"))
sys.path.insert(0, str(HERE))

from _helpers import launch_ranks, load_hf_state, spread_weights
from _te_standin import present_under_te_names
from _te_sync_worker import BUCKET_BYTES, RecordingEngine

from megatron_rl.checkpoint import convert, qwen2
from megatron_rl.megatron.model import GPTShape, build_gpt_model
from megatron_rl.weight_sync import WeightSync, build_plan

LAYOUTS = ("2x1", "1x2")


def _meta_state(config) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).state_dict()


def _shard_shapes(config, tp: int, pp: int, layer_spec: str) -> list[dict[str, tuple[int, ...]]]:
    real = {k: torch.zeros(v.shape) for k, v in _meta_state(config).items()}
    return [{n: tuple(t.shape) for n, t in qwen2.hf_to_megatron_shard(real, config, tp_size=tp, pp_rank=s, pp_size=pp,
                                                                         layer_spec=layer_spec).items()}
            for s in range(pp)]


CONFIGS = {
    "qwen2_tied": Qwen2Config(vocab_size=1030, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              tie_word_embeddings=True),
    "llama": LlamaConfig(vocab_size=1030, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False),
}


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (2, 2)])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_te_plan_is_the_local_plan_under_te_names(variant, tp, pp) -> None:
    config = CONFIGS[variant]
    shape = GPTShape.from_hf(config)
    plans = {spec: build_plan(shape, _shard_shapes(config, tp, pp, spec), tp_size=tp, dtype=torch.bfloat16,
                              bucket_bytes=200_000) for spec in ("local", "te")}
    local, te = plans["local"], plans["te"]
    assert te.buckets == local.buckets and te.hf_names == local.hf_names
    norms = 0
    for a, b in zip(local.entries, te.entries, strict=True):
        assert b.megatron_name == qwen2.te_param_name(a.megatron_name)
        norms += b.megatron_name != a.megatron_name
        assert (b.hf_names, b.kind, b.shard_shape, b.hf_shapes, b.pieces) == (a.hf_names, a.kind, a.shard_shape,
                                                                               a.hf_shapes, a.pieces)
    assert norms == 2 * shape.num_layers
    assert any(e.megatron_name.endswith("linear_qkv.layer_norm_weight") and
               e.hf_names == ("model.layers.0.input_layernorm.weight",) for e in te.entries)


def test_plan_refuses_stages_with_different_namings() -> None:
    config = CONFIGS["llama"]
    shapes = [_shard_shapes(config, 1, 2, "local")[0], _shard_shapes(config, 1, 2, "te")[1]]
    with pytest.raises(ValueError, match=r"pipeline stages use different layer names: \['local', 'te'\]"):
        build_plan(GPTShape.from_hf(config), shapes, tp_size=1, dtype=torch.float32)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from megatron_rl.testing import tiny_model

    dirs = {}
    for tied in (True, False):
        path = tiny_model(tmp_path_factory.mktemp(f"te_sync_tied{int(tied)}"), vocab_size=1030,
                          tie_word_embeddings=tied)
        spread_weights(path)
        dirs["tied" if tied else "untied"] = path
    return dirs


@pytest.mark.parametrize("tied", ["tied", "untied"])
def test_push_from_a_te_named_model_equals_the_hf_weights(model_dirs, tied) -> None:
    path = model_dirs[tied]
    config, hf = AutoConfig.from_pretrained(path), load_hf_state(path)
    pushed = {}
    with convert.one_process_world():
        for spec in ("local", "te"):
            model = build_gpt_model(config)
            if spec == "te":
                model = present_under_te_names(model)
            qwen2.load_hf_into_model(model, hf, config, tp_rank=0, tp_size=1)
            engine = RecordingEngine(config.tie_word_embeddings)
            sync = WeightSync(model, config, bucket_bytes=BUCKET_BYTES, dtype=torch.float32)
            stats = sync.push(engine)
            sync.check(engine)
            pushed[spec] = (engine.weights, engine.calls, stats["buckets"])
        with torch.no_grad():
            model.get_parameter("decoder.layers.1.mlp.linear_fc1.layer_norm_weight")[3] += 0.25
        with pytest.raises(ValueError, match=r"^engine weight model\.layers\.1\.post_attention_layernorm\.weight "
                                             r"differs .*mlp\.linear_fc1\.layer_norm_weight.* = 2\.500e-01"):
            sync.check(engine)
    weights, calls, buckets = pushed["te"]
    expected = {n: t for n, t in hf.items() if not (config.tie_word_embeddings and n == "lm_head.weight")}
    assert sorted(weights) == sorted(expected)
    assert all(torch.equal(weights[n], expected[n]) for n in expected)
    assert calls == pushed["local"][1] and buckets == len(calls)
    assert all(torch.equal(weights[n], pushed["local"][0][n]) for n in weights)


@pytest.fixture(scope="module")
def ranks(model_dirs, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("te_sync_out")
    return launch_ranks(HERE / "_te_sync_worker.py", [",".join(LAYOUTS), str(model_dirs["tied"])], out, 2,
                        timeout_s=400)


def test_two_rank_push_from_te_named_stages_equals_the_hf_weights(ranks, model_dirs) -> None:
    hf = load_hf_state(model_dirs["tied"])
    expected = {n: t for n, t in hf.items() if n != "lm_head.weight"}  # tied: the engine ties its head
    for layout in LAYOUTS:
        feeder = ranks[0][layout]
        assert ranks[1][layout]["weights"] is None
        for res in ranks:
            assert any(n.endswith("linear_qkv.layer_norm_weight") for n in res[layout]["names"])
            assert not any("input_layernorm" in n for n in res[layout]["names"])
        assert sorted(feeder["weights"]) == sorted(expected), layout
        for name in expected:
            assert torch.equal(feeder["weights"][name], expected[name]), (layout, name)
        assert feeder["stats"]["buckets"] == len(feeder["calls"])
    assert ranks[0]["2x1"]["shared_memory"]
    # The TE-named norm each rank changed is caught and named in HF terms: layer 0 (PP=1) / layers 0 and
    # 1 (PP=2; the first in stream order is reported), on every rank.
    for res in ranks:
        assert res["2x1"]["changed_error"].startswith("engine weight model.layers.0.input_layernorm.weight differs")
        assert res["1x2"]["changed_error"].startswith("engine weight model.layers.0.input_layernorm.weight differs")
