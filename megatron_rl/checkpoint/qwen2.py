"""Qwen2 / Qwen2.5 <-> Megatron-Core weights: an explicit name map plus the fused layouts.

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

Layer specs: the map is written in the local spec's parameter names. Transformer Engine layers fuse
each pre-norm into the next linear, so two names differ: ``input_layernorm.weight`` is
``self_attention.linear_qkv.layer_norm_weight`` and ``pre_mlp_layernorm.weight`` is
``mlp.linear_fc1.layer_norm_weight``; all else (layouts, splits) is the same. These TE names are not a
second table: :func:`te_layer_key_map` reads Megatron-Core's own local-to-TE map (the local spec's
``sharded_state_dict_keys_map``, by which Megatron stores local models under the TE names in
distributed checkpoints) and :func:`te_layer_name` applies it the way Megatron does. Every function
here takes either naming, decided from the parameter names it is given (:func:`layer_spec_of`), or
``layer_spec`` where it is given none. ``_extra_state`` entries (Megatron's and TE's per-module extra
state: FP8 metadata, no weights) are skipped where state dicts are read; any other unknown name raises.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from megatron_rl.megatron.model import GPTShape, padded_vocab_size

__all__ = ["LAYER_NAMINGS", "hf_to_megatron_shard", "is_extra_state", "layer_spec_of", "load_hf_into_model",
           "local_layer_name", "local_param_name", "megatron_param_names", "megatron_shards_to_hf", "qkv_shard_rows",
           "te_layer_key_map", "te_layer_name", "te_param_name"]

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
LAYER_PREFIX = "decoder.layers."
LOCAL, TE = "local", "te"
LAYER_NAMINGS = (LOCAL, TE)
"""The parameter namings of the decoder layers: the local spec's and Transformer Engine's."""
EXTRA_STATE_SUFFIX = "_extra_state"


@functools.cache
def te_layer_key_map() -> dict[str, str]:
    """Megatron-Core's map from local-spec to Transformer Engine names within a decoder layer, read from
    the local spec itself (``get_gpt_layer_local_spec(...).submodules.sharded_state_dict_keys_map``, which
    ``TransformerLayer.sharded_state_dict`` applies): old prefix -> new prefix. In megatron-core 0.16:
    ``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_`` and ``pre_mlp_layernorm.`` ->
    ``mlp.linear_fc1.layer_norm_``.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return dict(get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map)


def te_layer_name(name: str) -> str:
    """The TE name of a local-spec name within a layer (e.g. ``input_layernorm.weight`` ->
    ``self_attention.linear_qkv.layer_norm_weight``): the first prefix of :func:`te_layer_key_map` that
    matches is replaced, as Megatron's ``apply_prefix_mapping`` does; a name none matches is the same in
    both specs."""
    for old, new in te_layer_key_map().items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def local_layer_name(name: str) -> str:
    """The inverse of :func:`te_layer_name` (a TE name within a layer -> the local-spec name)."""
    for old, new in te_layer_key_map().items():
        if name.startswith(new):
            return old + name[len(new):]
    return name


def te_param_name(name: str) -> str:
    """:func:`te_layer_name` applied to a full parameter name (``decoder.layers.{i}.`` + a layer name);
    names outside the decoder layers are the same in both specs."""
    return _in_layer(name, te_layer_name)


def local_param_name(name: str) -> str:
    """:func:`local_layer_name` applied to a full parameter name (the inverse of :func:`te_param_name`)."""
    return _in_layer(name, local_layer_name)


def _in_layer(name: str, rename) -> str:
    if not name.startswith(LAYER_PREFIX):
        return name
    index, rest = name[len(LAYER_PREFIX):].split(".", 1)
    return f"{LAYER_PREFIX}{index}.{rename(rest)}"


def is_extra_state(name: str) -> bool:
    """Whether a state-dict key is a module's extra state (``..._extra_state``: Megatron's empty one, TE's
    serialised FP8 metadata), which holds no weight of the model."""
    return name.rsplit(".", 1)[-1] == EXTRA_STATE_SUFFIX


def layer_spec_of(names: Iterable[str]) -> str:
    """"te" when any of the parameter names is a Transformer Engine layer name that the local spec does not
    have (a norm weight held by ``linear_qkv`` / ``linear_fc1``), else "local"."""
    te_prefixes = tuple(te_layer_key_map().values())
    for name in names:
        if name.startswith(LAYER_PREFIX) and name[len(LAYER_PREFIX):].split(".", 1)[-1].startswith(te_prefixes):
            return TE
    return LOCAL


def _check_naming(layer_spec: str) -> None:
    if layer_spec not in LAYER_NAMINGS:
        raise ValueError(f"layer_spec={layer_spec!r} is not a parameter naming; allowed: {', '.join(LAYER_NAMINGS)} "
                         "(resolve 'auto' with megatron_rl.megatron.model.resolve_layer_spec)")


def _layer_map(shape: GPTShape, layer_spec: str = LOCAL) -> dict[str, tuple[tuple[str, ...], str]]:
    _check_naming(layer_spec)
    rename = te_layer_name if layer_spec == TE else (lambda name: name)
    out = {rename(k): v for k, v in LAYER_MAP.items() if shape.qkv_bias or k not in QKV_BIAS_NAMES}
    if len(out) != len(LAYER_MAP) - (0 if shape.qkv_bias else len(QKV_BIAS_NAMES)):
        raise AssertionError(f"Megatron's key map {te_layer_key_map()} merges two layer parameters")
    return out


def _stage_layers(shape: GPTShape, pp_rank: int, pp_size: int) -> range:
    if shape.num_layers % pp_size:
        raise ValueError(f"num_layers={shape.num_layers} is not divisible by pp_size={pp_size}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} is outside [0, pp_size={pp_size})")
    per_stage = shape.num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _stage_names(shape: GPTShape, pp_rank: int, pp_size: int,
                 layer_spec: str = LOCAL) -> dict[str, tuple[tuple[str, ...], str]]:
    """Megatron name -> (HF names, split kind) for every parameter of one pipeline stage, in the parameter
    names of ``layer_spec`` ("local" or "te")."""
    names: dict[str, tuple[tuple[str, ...], str]] = {}
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    if first:
        names[EMBEDDING[0]] = ((EMBEDDING[1],), VOCAB)
    for local, layer in enumerate(_stage_layers(shape, pp_rank, pp_size)):
        for mname, (hf_names, kind) in _layer_map(shape, layer_spec).items():
            names[f"decoder.layers.{local}.{mname}"] = (tuple(f"model.layers.{layer}.{n}" for n in hf_names), kind)
    if last:
        names[FINAL_NORM[0]] = ((FINAL_NORM[1],), REPLICATED)
        if not shape.tied_embeddings:
            names[OUTPUT_LAYER[0]] = ((OUTPUT_LAYER[1],), VOCAB)
        elif pp_size > 1:  # the last stage keeps its own copy of the tied embedding
            names[OUTPUT_LAYER[0]] = ((EMBEDDING[1],), VOCAB)
    return names


def megatron_param_names(hf_config: Any, pp_rank: int = 0, pp_size: int = 1, *, layer_spec: str = LOCAL) -> list[str]:
    """The parameter names of one pipeline stage of the Megatron model built with ``layer_spec`` ("local"
    or "te"), in map order."""
    return list(_stage_names(GPTShape.from_hf(hf_config), pp_rank, pp_size, layer_spec))


def _check_tp(shape: GPTShape, tp_rank: int, tp_size: int) -> None:
    """Raise ValueError unless Megatron can split this model over ``tp_size`` ranks (naming the field)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, tp_size={tp_size})")
    problem = _tp_problem(shape, tp_size)
    if problem is not None:  # say which sizes would work: the heads / KV heads decide it
        allowed = [size for size in range(1, shape.num_attention_heads + 1) if _tp_problem(shape, size) is None]
        raise ValueError(f"{problem}; this model has {shape.num_attention_heads} attention heads and "
                         f"{shape.num_query_groups} KV heads: tp_size must be one of {allowed}")


def _tp_problem(shape: GPTShape, tp_size: int) -> str | None:
    """Why Megatron cannot split this model over ``tp_size`` ranks, or None."""
    for name, value in (("ffn_hidden_size", shape.ffn_hidden_size), ("num_attention_heads", shape.num_attention_heads)):
        if value % tp_size:
            return f"{name}={value} is not divisible by tp_size={tp_size}"
    groups = shape.num_query_groups
    if groups % tp_size and tp_size % groups:
        return (f"num_query_groups={groups} and tp_size={tp_size}: one must divide the other (TP splits "
                "whole KV groups, or each KV group over tp_size / num_query_groups ranks)")
    if _qkv_fused_rows(shape) % tp_size:
        return f"the fused q/k/v rows ({_qkv_fused_rows(shape)}) are not divisible by tp_size={tp_size}"
    return None


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
    layer_spec: str | None = None,
) -> dict[str, Tensor]:
    """The Megatron state dict of one (tp_rank, pp_rank) shard, built from full HF tensors.

    Args:
        hf_state: HF name -> tensor for the whole model (``lm_head.weight`` may be absent when tied).
        megatron_names: if given (e.g. ``[n for n, _ in model.named_parameters()]``), the produced names
            must be exactly these; they also decide the naming ("local" or "te", :func:`layer_spec_of`).
        layer_spec: the naming of the produced names ("local" or "te"); default: that of
            ``megatron_names``, else "local".

    Raises:
        ValueError: ``layer_spec`` is not "local" or "te".
        KeyError: an HF tensor the map does not use (other than the tied ``lm_head.weight``), a mapped HF
            name that is absent, or a name in ``megatron_names`` that the map does not produce (or vice
            versa); the message names them.
    """
    shape = GPTShape.from_hf(hf_config)
    _check_tp(shape, tp_rank, tp_size)
    vocab = padded_vocab_size(shape.vocab_size, make_vocab_size_divisible_by, tp_size)
    _check_hf_names(shape, hf_state)
    if layer_spec is None:
        layer_spec = layer_spec_of(megatron_names) if megatron_names is not None else LOCAL
    stage = _stage_names(shape, pp_rank, pp_size, layer_spec)
    if megatron_names is not None:
        _check_same(set(megatron_names), set(stage), "Megatron model", f"qwen2 map ({layer_spec} layer names)")
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
        shards: ``shards[pp_rank][tp_rank]`` is that rank's Megatron state dict, in local or TE names
            (:func:`layer_spec_of`); ``_extra_state`` entries are ignored (:func:`is_extra_state`).

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
        layer_spec = layer_spec_of(stage_shards[0])
        stage = _stage_names(shape, pp_rank, pp_size, layer_spec)
        for tp_rank, shard in enumerate(stage_shards):
            names = {n for n in shard if not is_extra_state(n)}
            _check_same(names, set(stage), f"Megatron shard (pp={pp_rank}, tp={tp_rank})",
                        f"qwen2 map ({layer_spec} layer names)")
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
    """Copy this rank's shard of ``hf_state`` into ``model``'s parameters (names checked both ways; local or
    Transformer Engine names, as the model has them)."""
    params = dict(model.named_parameters())
    shard = hf_to_megatron_shard(
        hf_state, hf_config, tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, megatron_names=list(params),
    )
    for name, param in params.items():
        if param.shape != shard[name].shape:
            raise ValueError(f"{name}: model has shape {tuple(param.shape)}, converted {tuple(shard[name].shape)}")
        param.copy_(shard[name])
