"""Qwen2 / Qwen2.5 <-> Megatron-Core (local spec) weights: an explicit name map plus the fused layouts.

Megatron layout (DESIGN.md, "Megatron-Core layout facts"), for the model of
:func:`megatron_rl.megatron.model.build_gpt_model`:

- ``linear_qkv`` rows are grouped per KV group: the group's ``heads/groups`` query heads, then its
  key head, then its value head. Each TP rank holds an even ``1/tp`` slice of these fused rows
  (:func:`qkv_shard_rows`): whole groups when ``groups % tp == 0``; when ``groups < tp`` each group
  is split over ``tp / groups`` ranks (Megatron's attention all-gathers the rows and picks its
  heads). The bias follows the same layout.
- ``linear_fc1`` holds, per TP rank, ``[gate shard; up shard]``.
- ``linear_proj`` and ``linear_fc2`` are row-parallel (split on the input dim, HF dim 1); the word
  embedding and an untied output layer are split on vocab rows after zero-padding the vocabulary to
  a multiple of ``make_vocab_size_divisible_by * tp``. Exports cut the padding off again.
- Norms are replicated. With tied embeddings there is no output layer (PP=1).

Pipeline stages hold consecutive layers, ``num_layers / pp`` each, named from 0 on every stage.
Every conversion is checked both ways: an HF or Megatron name that is not mapped, or a mapped
name that is missing, raises ``KeyError`` naming it. Llama uses the same map without q/k/v bias.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from megatron_rl.megatron.model import GPTShape, padded_vocab_size

__all__ = ["hf_to_megatron_shard", "load_hf_into_model", "megatron_param_names", "megatron_shards_to_hf",
           "qkv_shard_rows"]

Tensor = torch.Tensor

# How a tensor is split over TP ranks.
REPLICATED, VOCAB, ROW_PARALLEL_INPUT, QKV, FC1 = "replicated", "vocab", "row_parallel_input", "qkv", "fc1"

# Megatron name (within decoder.layers.{i}.) -> (HF names within model.layers.{i}., how it is split).
LAYER_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), REPLICATED),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
    "self_attention.linear_qkv.bias": (
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), ROW_PARALLEL_INPUT),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), REPLICATED),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), FC1),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), ROW_PARALLEL_INPUT),
}
EMBEDDING = ("embedding.word_embeddings.weight", "model.embed_tokens.weight")
FINAL_NORM = ("decoder.final_layernorm.weight", "model.norm.weight")
OUTPUT_LAYER = ("output_layer.weight", "lm_head.weight")
QKV_BIAS_NAMES = ("self_attention.linear_qkv.bias",)


def _layer_map(shape: GPTShape) -> dict[str, tuple[tuple[str, ...], str]]:
    return {k: v for k, v in LAYER_MAP.items() if shape.qkv_bias or k not in QKV_BIAS_NAMES}


def _stage_layers(shape: GPTShape, pp_rank: int, pp_size: int) -> range:
    if shape.num_layers % pp_size:
        raise ValueError(f"num_layers={shape.num_layers} is not divisible by pp_size={pp_size}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} is outside [0, pp_size={pp_size})")
    per_stage = shape.num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _stage_names(shape: GPTShape, pp_rank: int, pp_size: int) -> dict[str, tuple[tuple[str, ...], str]]:
    """Megatron name -> (HF names, split kind) for every parameter of one pipeline stage."""
    names: dict[str, tuple[tuple[str, ...], str]] = {}
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    if first:
        names[EMBEDDING[0]] = ((EMBEDDING[1],), VOCAB)
    for local, layer in enumerate(_stage_layers(shape, pp_rank, pp_size)):
        for mname, (hf_names, kind) in _layer_map(shape).items():
            names[f"decoder.layers.{local}.{mname}"] = (tuple(f"model.layers.{layer}.{n}" for n in hf_names), kind)
    if last:
        names[FINAL_NORM[0]] = ((FINAL_NORM[1],), REPLICATED)
        if not shape.tied_embeddings:
            names[OUTPUT_LAYER[0]] = ((OUTPUT_LAYER[1],), VOCAB)
        elif pp_size > 1:  # the last stage keeps its own copy of the tied embedding
            names[OUTPUT_LAYER[0]] = ((EMBEDDING[1],), VOCAB)
    return names


def megatron_param_names(hf_config: Any, pp_rank: int = 0, pp_size: int = 1) -> list[str]:
    """The parameter names of one pipeline stage of the Megatron model, in map order."""
    return list(_stage_names(GPTShape.from_hf(hf_config), pp_rank, pp_size))


def _check_tp(shape: GPTShape, tp_rank: int, tp_size: int) -> None:
    """Raise ValueError unless Megatron can split this model over ``tp_size`` ranks (naming the field)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, tp_size={tp_size})")
    for name, value in (("ffn_hidden_size", shape.ffn_hidden_size), ("num_attention_heads", shape.num_attention_heads)):
        if value % tp_size:
            raise ValueError(f"{name}={value} is not divisible by tp_size={tp_size}")
    groups = shape.num_query_groups
    if groups % tp_size and tp_size % groups:
        raise ValueError(f"num_query_groups={groups} and tp_size={tp_size}: one must divide the other (TP splits "
                         "whole KV groups, or each KV group over tp_size / num_query_groups ranks)")
    if _qkv_fused_rows(shape) % tp_size:
        raise ValueError(f"the fused q/k/v rows ({_qkv_fused_rows(shape)}) are not divisible by tp_size={tp_size}")


def _qkv_fused_rows(shape: GPTShape) -> int:
    return (shape.num_attention_heads + 2 * shape.num_query_groups) * shape.head_dim


def qkv_shard_rows(shape: GPTShape, tp_rank: int, tp_size: int) -> slice:
    """The rows of the fused q/k/v tensor (all KV groups, each ``[queries; key; value]``, as made by
    :func:`_fuse_qkv` and flattened) that TP rank ``tp_rank`` holds in ``linear_qkv``: an even
    ``1/tp_size`` slice. That is whole KV groups when ``num_query_groups % tp_size == 0`` and a part of
    one group when ``num_query_groups < tp_size`` (Megatron then all-gathers the rows in attention).

    Raises:
        ValueError: the layout is not one Megatron can split (see :func:`_check_tp`).
    """
    _check_tp(shape, tp_rank, tp_size)
    rows = _qkv_fused_rows(shape) // tp_size
    return slice(tp_rank * rows, (tp_rank + 1) * rows)


def _fuse_qkv(shape: GPTShape, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(heads*hd, ...), (groups*hd, ...) x2 -> (groups, (heads/groups + 2) * hd, ...)."""
    groups, hd = shape.num_query_groups, shape.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, shape.num_attention_heads // groups * hd, *rest)
    return torch.cat([q, k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)], dim=1)


def _split_qkv(shape: GPTShape, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`_fuse_qkv` on the gathered (groups * per_group, ...) tensor."""
    groups, hd = shape.num_query_groups, shape.head_dim
    q_per_group = shape.num_attention_heads // groups * hd
    grouped = fused.reshape(groups, q_per_group + 2 * hd, *fused.shape[1:])
    q, k, v = torch.split(grouped, [q_per_group, hd, hd], dim=1)
    q, k, v = (t.reshape(-1, *fused.shape[1:]).contiguous() for t in (q, k, v))
    return q, k, v


def _to_shard(shape: GPTShape, kind: str, tensors: list[Tensor], tp_rank: int, tp_size: int, vocab: int) -> Tensor:
    if kind == REPLICATED:
        return tensors[0].clone()
    if kind == VOCAB:
        (full,) = tensors
        padded = full.new_zeros((vocab, *full.shape[1:]))
        padded[: full.shape[0]] = full
        return padded.chunk(tp_size, dim=0)[tp_rank].clone()
    if kind == ROW_PARALLEL_INPUT:
        return tensors[0].chunk(tp_size, dim=1)[tp_rank].clone()
    if kind == QKV:
        return _fuse_qkv(shape, *tensors).flatten(0, 1)[qkv_shard_rows(shape, tp_rank, tp_size)].clone()
    if kind == FC1:
        gate, up = tensors
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    raise AssertionError(kind)


def hf_to_megatron_shard(
    hf_state: Mapping[str, Tensor],
    hf_config: Any,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
    megatron_names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """The Megatron state dict of one (tp_rank, pp_rank) shard, built from full HF tensors.

    Args:
        hf_state: HF name -> tensor for the whole model (``lm_head.weight`` may be absent when tied).
        megatron_names: if given (e.g. ``[n for n, _ in model.named_parameters()]``), the produced names
            must be exactly these.

    Raises:
        KeyError: an HF tensor the map does not use (other than the tied ``lm_head.weight``), a mapped HF
            name that is absent, or a name in ``megatron_names`` that the map does not produce (or vice
            versa); the message names them.
    """
    shape = GPTShape.from_hf(hf_config)
    _check_tp(shape, tp_rank, tp_size)
    vocab = padded_vocab_size(shape.vocab_size, make_vocab_size_divisible_by, tp_size)
    _check_hf_names(shape, hf_state)
    stage = _stage_names(shape, pp_rank, pp_size)
    if megatron_names is not None:
        _check_same(set(megatron_names), set(stage), "Megatron model", "qwen2 map")
    out: dict[str, Tensor] = {}
    for mname, (hf_names, kind) in stage.items():
        out[mname] = _to_shard(shape, kind, [hf_state[n] for n in hf_names], tp_rank, tp_size, vocab)
    return out


def _check_hf_names(shape: GPTShape, hf_state: Mapping[str, Tensor]) -> None:
    used = {n for hf_names, _ in _stage_names(shape, 0, 1).values() for n in hf_names}
    given = set(hf_state)
    if shape.tied_embeddings:
        given.discard(OUTPUT_LAYER[1])  # some tied checkpoints still store it (a copy of the embedding)
    _check_same(given, used, "HF state", "qwen2 map")


def _check_same(have: set[str], expected: set[str], have_name: str, expected_name: str) -> None:
    missing, extra = sorted(expected - have), sorted(have - expected)
    if missing or extra:
        raise KeyError(
            f"{have_name} and {expected_name} disagree: missing from {have_name}: {missing or 'none'}; "
            f"not in {expected_name}: {extra or 'none'}"
        )


def megatron_shards_to_hf(
    shards: Sequence[Sequence[Mapping[str, Tensor]]],
    hf_config: Any,
) -> dict[str, Tensor]:
    """Gather Megatron shards into full HF tensors (vocab padding cut off; no lm_head when tied).

    Args:
        shards: ``shards[pp_rank][tp_rank]`` is that rank's Megatron state dict (``_extra_state`` entries
            are ignored).

    Raises:
        KeyError: a shard lacks a mapped name or holds a tensor name the map does not know.
    """
    shape = GPTShape.from_hf(hf_config)
    pp_size, tp_size = len(shards), len(shards[0])
    _check_tp(shape, 0, tp_size)
    out: dict[str, Tensor] = {}
    for pp_rank, stage_shards in enumerate(shards):
        if len(stage_shards) != tp_size:
            raise ValueError(f"pipeline stage {pp_rank} has {len(stage_shards)} TP shards, stage 0 has {tp_size}")
        stage = _stage_names(shape, pp_rank, pp_size)
        for tp_rank, shard in enumerate(stage_shards):
            names = {n for n in shard if not n.endswith("._extra_state")}
            _check_same(names, set(stage), f"Megatron shard (pp={pp_rank}, tp={tp_rank})", "qwen2 map")
        for mname, (hf_names, kind) in stage.items():
            if shape.tied_embeddings and mname == OUTPUT_LAYER[0]:
                continue  # the tied copy on the last stage; the embedding is exported from stage 0
            parts = [shard[mname] for shard in stage_shards]
            for name, tensor in zip(hf_names, _from_shards(shape, kind, parts), strict=True):
                out[name] = tensor
    return out


def _from_shards(shape: GPTShape, kind: str, parts: list[Tensor]) -> list[Tensor]:
    if kind == REPLICATED:
        return [parts[0].clone()]
    if kind == VOCAB:
        return [torch.cat(parts, dim=0)[: shape.vocab_size].clone()]
    if kind == ROW_PARALLEL_INPUT:
        return [torch.cat(parts, dim=1)]
    if kind == QKV:
        return list(_split_qkv(shape, torch.cat(parts, dim=0)))
    if kind == FC1:
        halves = [p.chunk(2, dim=0) for p in parts]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    raise AssertionError(kind)


@torch.no_grad()
def load_hf_into_model(
    model: torch.nn.Module,
    hf_state: Mapping[str, Tensor],
    hf_config: Any,
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    pp_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
) -> None:
    """Copy this rank's shard of ``hf_state`` into ``model``'s parameters (names checked both ways)."""
    params = dict(model.named_parameters())
    shard = hf_to_megatron_shard(
        hf_state, hf_config, tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, megatron_names=list(params),
    )
    for name, param in params.items():
        if param.shape != shard[name].shape:
            raise ValueError(f"{name}: model has shape {tuple(param.shape)}, converted {tuple(shard[name].shape)}")
        param.copy_(shard[name])
