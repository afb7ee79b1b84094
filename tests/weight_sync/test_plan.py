"""The weight-sync plan without processes or vLLM: bucket packing, fused groups, names and shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_rl.checkpoint.qwen2 import hf_to_megatron_shard
from megatron_rl.megatron.model import GPTShape
from megatron_rl.weight_sync import build_plan, fused_key, pack_buckets


def test_pack_buckets_by_hand() -> None:
    # bucket 6: [3] (3+4 > 6), [4] (4+10 > 6), [10] alone (larger than a bucket), [2, 2, 1] = 5
    assert pack_buckets([3, 4, 10, 2, 2, 1], 6) == [[0], [1], [2], [3, 4, 5]]
    assert pack_buckets([6, 6], 6) == [[0], [1]]  # exactly full
    assert pack_buckets([], 6) == []
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        pack_buckets([1], 0)


def test_fused_key() -> None:
    keys = {fused_key(f"model.layers.3.self_attn.{p}_proj.{k}") for p in "qkv" for k in ("weight", "bias")}
    assert keys == {"model.layers.3.self_attn.q_proj+k_proj+v_proj"}
    assert fused_key("model.layers.3.mlp.gate_proj.weight") == fused_key("model.layers.3.mlp.up_proj.weight")
    assert fused_key("model.layers.4.mlp.up_proj.weight") != fused_key("model.layers.3.mlp.up_proj.weight")
    assert fused_key("model.layers.3.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj.weight"
    assert fused_key("model.layers.3.self_attn.o_proj.weight") == "model.layers.3.self_attn.o_proj.weight"


def _hf_model(tied: bool, num_layers: int = 2):
    config = Qwen2Config(vocab_size=1030, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    with torch.device("meta"):
        state = Qwen2ForCausalLM(config).state_dict()
    return config, state


def _shard_shapes(config, state, tp: int, pp: int) -> list[dict[str, tuple[int, ...]]]:
    real = {k: torch.zeros(v.shape) for k, v in state.items()}
    return [{n: tuple(t.shape) for n, t in hf_to_megatron_shard(real, config, tp_size=tp, pp_rank=s, pp_size=pp).items()}
            for s in range(pp)]


@pytest.mark.parametrize(("tied", "tp", "pp"), [(True, 2, 2), (False, 2, 1), (True, 1, 1)])
def test_plan_covers_every_hf_tensor_once_with_its_shape(tied: bool, tp: int, pp: int) -> None:
    config, state = _hf_model(tied)
    plan = build_plan(GPTShape.from_hf(config), _shard_shapes(config, state, tp, pp), tp_size=tp,
                      dtype=torch.bfloat16, bucket_bytes=1 << 30)
    expected = {k: tuple(v.shape) for k, v in state.items() if not (tied and k == "lm_head.weight")}
    names = plan.hf_names
    assert len(names) == len(set(names))
    got = {n: s for e in plan.entries for n, s in zip(e.hf_names, e.hf_shapes, strict=True)}
    assert got == expected  # vocab cut back to 1030 rows, q/k/v and gate/up un-fused
    assert plan.num_bytes == sum(torch.Size(s).numel() for s in expected.values()) * 2  # bf16
    assert (plan.tied_copy is not None) == (tied and pp > 1)
    assert len(plan.buckets) == 1  # everything fits in 1 GiB


def test_buckets_keep_fused_groups_whole_and_bounded() -> None:
    config, state = _hf_model(tied=False, num_layers=4)
    bucket_bytes = 100_000  # q/k/v + biases of a layer (~99 KB fp32) fit; gate/up (262 KB), down (131 KB),
    plan = build_plan(GPTShape.from_hf(config), _shard_shapes(config, state, 2, 2), tp_size=2,  # embedding
                      dtype=torch.float32, bucket_bytes=bucket_bytes)  # and lm_head (527 KB) do not
    sizes = {n: torch.Size(s).numel() * 4 for e in plan.entries for n, s in zip(e.hf_names, e.hf_shapes)}
    buckets = [[n for i in b for n in plan.entries[i].hf_names] for b in plan.buckets]
    assert [n for b in buckets for n in b] == plan.hf_names  # stream order kept, every tensor once
    where = {n: i for i, b in enumerate(buckets) for n in b}
    for layer in range(4):
        prefix = f"model.layers.{layer}."
        assert len({where[prefix + f"self_attn.{p}_proj.{k}"] for p in "qkv" for k in ("weight", "bias")}) == 1
        assert where[prefix + "mlp.gate_proj.weight"] == where[prefix + "mlp.up_proj.weight"]
    for bucket in buckets:
        total = sum(sizes[n] for n in bucket)
        if total > bucket_bytes:  # only one oversize tensor or fused group, alone
            assert len({fused_key(n) for n in bucket}) == 1, bucket
    alone = [b for b in buckets if b == ["model.embed_tokens.weight"] or b == ["lm_head.weight"]]
    assert len(alone) == 2


def test_plan_names_a_parameter_the_map_does_not_know() -> None:
    config, state = _hf_model(tied=True)
    shapes = _shard_shapes(config, state, 1, 1)
    shapes[0]["decoder.layers.0.extra.weight"] = (4, 4)
    with pytest.raises(KeyError, match=r"decoder\.layers\.0\.extra\.weight"):
        build_plan(GPTShape.from_hf(config), shapes, tp_size=1, dtype=torch.float32)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_pieces_rebuild_what_the_checkpoint_map_unshards(tp: int) -> None:
    """The slice copies the plan derives (Piece) give the same HF tensors as the map's own un-sharding of
    random shards, for every kind (vocabulary cut, per-group q/k/v with 2 KV heads over 4 ranks, gate/up,
    row-parallel columns, replicated)."""
    from megatron_rl.checkpoint.qwen2 import _from_shards

    config, state = _hf_model(tied=False)
    shape = GPTShape.from_hf(config)
    plan = build_plan(shape, _shard_shapes(config, state, tp, 1), tp_size=tp, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for entry in plan.entries:
        shards = [torch.randn(entry.shard_shape, generator=generator) for _ in range(tp)]
        for piece, hf_shape, expected in zip(entry.pieces, entry.hf_shapes, _from_shards(shape, entry.kind, shards),
                                             strict=True):
            got = torch.full(hf_shape, float("nan"))
            for shard, start, offset, length in piece.segments:
                got.narrow(piece.dim, offset, length).copy_(shards[shard].narrow(piece.dim, start, length))
            assert torch.equal(got, expected), (entry.megatron_name, tp)
        if entry.kind == "replicated":
            assert entry.shards_used == {0}  # the other ranks' copies are never sent
