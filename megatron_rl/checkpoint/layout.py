"""Where every model tensor lives in a Megatron distributed checkpoint, worked out from the HF config alone.

``GPTModel.sharded_state_dict()`` stores each parameter as one *global* tensor: the TP
shards of a rank are chunks of it and the layers of all pipeline stages are stacked on a leading
layer axis. So the stored model does not depend on the TP/PP layout it was saved at, except for the
vocabulary padding (embedding and output rows, loaded with ``allow_shape_mismatch``). For a model of
``L`` layers, ``P`` padded vocabulary rows, hidden ``H``, ``R = (heads + 2 * kv_groups) * head_dim``
(the fused q/k/v rows, grouped per KV group as in :mod:`megatron_rl.checkpoint.qwen2`), ``F`` the MLP
width, ``Q = heads * head_dim``.

Keys, global shapes and the HF tensors of layer ``i`` they hold::

    embedding.word_embeddings.weight                               (P, H)      model.embed_tokens (zero-padded)
    decoder.layers.self_attention.linear_qkv.layer_norm_weight     (L, H)      input_layernorm
    decoder.layers.self_attention.linear_qkv.weight / .bias        (L, R, H)   q/k/v_proj, per KV group
    decoder.layers.self_attention.linear_proj.weight               (L, H, Q)   o_proj
    decoder.layers.mlp.linear_fc1.layer_norm_weight                (L, H)      post_attention_layernorm
    decoder.layers.mlp.linear_fc1.weight                           (L, 2F, H)  [gate_proj; up_proj]
    decoder.layers.mlp.linear_fc2.weight                           (L, H, F)   down_proj
    decoder.final_layernorm.weight                                 (H,)        model.norm
    output_layer.weight (untied only)                              (P, H)      lm_head (zero-padded)

The layer keys are the Transformer Engine parameter names whatever the layer spec: the local spec's
``sharded_state_dict_keys_map`` renames its two norm weights (``input_layernorm.weight``,
``pre_mlp_layernorm.weight``) to them, and the keys here come from that same map
(:func:`megatron_rl.checkpoint.qwen2.te_layer_name`), so a checkpoint loads into either spec.

Megatron writes these in chunks of one layer and one TP rank: column-parallel tensors (vocab, q/k/v)
split on rows, row-parallel ones (o_proj, down_proj) on columns, ``linear_fc1`` as two chunks per rank
(its gate rows at ``r * F/tp`` and its up rows at ``F + r * F/tp``), norms whole. Each of the four
linear layers of a layer also has an ``_extra_state`` object (``None`` for the local spec), stored
once per layer under ``{key}._extra_state/shard_{i}_{L}``. The tests compare all of this with what
Megatron itself saves. Transformer Engine modules add extra-state objects of their own (e.g. the final
norm's, with TE installed); a converted checkpoint lacks them and
:func:`megatron_rl.checkpoint.distributed.load_checkpoint` leaves them at their defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from megatron_rl.checkpoint.qwen2 import (
    FC1,
    LAYER_PREFIX,
    QKV,
    REPLICATED,
    ROW_PARALLEL_INPUT,
    TE,
    VOCAB,
    _check_tp,
    _fuse_qkv,
    _split_qkv,
    _stage_names,
    qkv_shard_rows,
)
from megatron_rl.megatron.model import GPTShape

__all__ = ["Chunk", "HFSource", "ModelTensor", "describe_config", "extra_state_keys", "hf_tensor_shapes", "model_tensors"]

# The linear layers whose (empty) ``_extra_state`` Megatron stores once per layer.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                       "mlp.linear_fc2")



class HFSource(Protocol):
    """Read access to the tensors of an HF checkpoint, by name."""

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """``rows`` / ``cols`` (None: all) of tensor ``name``."""

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One stored piece of a :class:`ModelTensor`: one layer (if layered) of one TP rank's shard."""

    layer: int | None
    tp_rank: int
    part: int  # 0, or 1 for the up half of linear_fc1
    offsets: tuple[int, ...]  # global, layer axis included
    sizes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelTensor:
    """One global tensor of the checkpoint and the HF tensors it is made of.

    ``hf_names`` use ``{layer}`` for the layer index when ``num_layers`` is set (a stacked tensor)."""

    key: str
    hf_names: tuple[str, ...]
    kind: str  # split kind, see megatron_rl.checkpoint.qwen2
    layer_shape: tuple[int, ...]  # the global shape of one layer (or of the whole tensor)
    num_layers: int | None = None

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self.layer_shape if self.num_layers is None else (self.num_layers, *self.layer_shape)

    @property
    def is_vocab(self) -> bool:
        return self.kind == VOCAB

    def layers(self) -> list[int | None]:
        return [None] if self.num_layers is None else list(range(self.num_layers))

    def names_of(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(layer=layer) for n in self.hf_names)

    def chunks(self, shape: GPTShape, tp_size: int) -> Iterator[Chunk]:
        """The chunks Megatron writes for this tensor when saved at ``tp_size`` (layer by layer)."""
        _check_tp(shape, 0, tp_size)
        for layer in self.layers():
            lead = () if layer is None else (layer,)
            one = () if layer is None else (1,)
            for tp_rank in range(1 if self.kind == REPLICATED else tp_size):
                for part, (offsets, sizes) in enumerate(self._rank_boxes(shape, tp_rank, tp_size)):
                    yield Chunk(layer, tp_rank, part, (*lead, *offsets), (*one, *sizes))

    def _rank_boxes(self, shape: GPTShape, tp_rank: int, tp_size: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        dims = self.layer_shape
        zeros = (0,) * (len(dims) - 1)
        if self.kind == REPLICATED:
            return [((0,) * len(dims), dims)]
        if self.kind in (VOCAB, QKV):
            rows = dims[0] // tp_size
            return [((tp_rank * rows, *zeros), (rows, *dims[1:]))]
        if self.kind == ROW_PARALLEL_INPUT:
            cols = dims[1] // tp_size
            return [((0, tp_rank * cols), (dims[0], cols))]
        if self.kind == FC1:
            rows = shape.ffn_hidden_size // tp_size
            return [((half * shape.ffn_hidden_size + tp_rank * rows, 0), (rows, dims[1])) for half in (0, 1)]
        raise AssertionError(self.kind)

    def chunk_data(self, shape: GPTShape, chunk: Chunk, tp_size: int, source: HFSource) -> torch.Tensor:
        """The values of ``chunk``, read from ``source`` (only the rows / columns it needs)."""
        read = source.read
        names = self.names_of(chunk.layer)
        r, kind = chunk.tp_rank, self.kind
        if kind == REPLICATED:
            data = read(names[0], None, None)
        elif kind == VOCAB:
            data = _vocab_rows(source, names[0], chunk.offsets[-2], chunk.sizes[-2], shape)
        elif kind == ROW_PARALLEL_INPUT:
            cols = chunk.sizes[-1]
            data = read(names[0], None, slice(r * cols, (r + 1) * cols))
        elif kind == QKV:
            data = _qkv_rank_rows(shape, names, r, tp_size, read)
        elif kind == FC1:
            rows = shape.ffn_hidden_size // tp_size
            data = read(names[chunk.part], slice(r * rows, (r + 1) * rows), None)
        else:
            raise AssertionError(kind)
        return data if chunk.layer is None else data.unsqueeze(0)

    def to_hf(self, shape: GPTShape, full: torch.Tensor) -> list[torch.Tensor]:
        """The HF tensors (in ``hf_names`` order) in this tensor's global value (one layer's slice if
        layered): the global value is the TP=1 layout, so only q/k/v need a copy; the others are views."""
        if self.kind == QKV:
            return list(_split_qkv(shape, full))
        if self.kind == FC1:
            return list(full.chunk(2, dim=0))  # [gate; up]
        if self.kind == VOCAB:
            return [full[: shape.vocab_size]]
        return [full]


def _vocab_rows(source: HFSource, name: str, start: int, rows: int, shape: GPTShape) -> torch.Tensor:
    """Rows [start, start + rows) of the zero-padded vocabulary, read in blocks of about 16 MB so that
    memory holds the chunk and one block."""
    data = torch.zeros((rows, shape.hidden_size), dtype=source.dtype(name))
    stop = min(start + rows, shape.vocab_size)
    block = max(1, (16 << 20) // (shape.hidden_size * data.element_size()))
    for row in range(start, stop, block):
        end = min(row + block, stop)
        data[row - start : end - start] = source.read(name, slice(row, end), None)
    return data


def _qkv_rank_rows(shape: GPTShape, names: tuple[str, ...], tp_rank: int, tp_size: int, read) -> torch.Tensor:
    """TP rank ``tp_rank``'s fused q/k/v rows (:func:`~megatron_rl.checkpoint.qwen2.qkv_shard_rows`), read
    from q/k/v_proj for only the KV groups those rows fall in (whole groups, or a part of one)."""
    rows = qkv_shard_rows(shape, tp_rank, tp_size)
    q_heads = shape.num_attention_heads // shape.num_query_groups
    per_group = (q_heads + 2) * shape.head_dim
    g0, g1 = rows.start // per_group, -(-rows.stop // per_group)
    q_rows, kv_rows = q_heads * shape.head_dim, shape.head_dim
    q = read(names[0], slice(g0 * q_rows, g1 * q_rows), None)
    k = read(names[1], slice(g0 * kv_rows, g1 * kv_rows), None)
    v = read(names[2], slice(g0 * kv_rows, g1 * kv_rows), None)
    local = dataclasses.replace(shape, num_query_groups=g1 - g0, num_attention_heads=(g1 - g0) * q_heads)
    fused = _fuse_qkv(local, q, k, v).flatten(0, 1)
    return fused[rows.start - g0 * per_group : rows.stop - g0 * per_group]


def hf_tensor_shapes(shape: GPTShape) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor an HF checkpoint of this config must hold (no lm_head when tied)."""
    H, F, V, hd = shape.hidden_size, shape.ffn_hidden_size, shape.vocab_size, shape.head_dim
    q, kv = shape.num_attention_heads * hd, shape.num_query_groups * hd
    per_layer = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H), "self_attn.v_proj.weight": (kv, H),
        "self_attn.o_proj.weight": (H, q), "mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H),
        "mlp.down_proj.weight": (H, F),
    }
    if shape.qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(shape.num_layers):
        shapes.update({f"model.layers.{i}.{name}": dims for name, dims in per_layer.items()})
    shapes["model.norm.weight"] = (H,)
    if not shape.tied_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def model_tensors(shape: GPTShape, padded_vocab: int) -> list[ModelTensor]:
    """Every model tensor of the checkpoint, in the order of the HF model (embedding, layers, norm, head)."""
    hf_shapes = hf_tensor_shapes(shape)
    out = []
    for mname, (hf_names, kind) in _stage_names(shape, 0, 1, TE).items():
        if mname.startswith(LAYER_PREFIX):
            index, name = mname.removeprefix(LAYER_PREFIX).split(".", 1)
            if index != "0":
                continue  # one entry per stacked tensor
            key = LAYER_PREFIX + name
            templates = tuple(n.replace("model.layers.0.", "model.layers.{layer}.", 1) for n in hf_names)
            out.append(ModelTensor(key, templates, kind, _layer_shape(kind, hf_names, hf_shapes), shape.num_layers))
        else:
            dims = (padded_vocab, shape.hidden_size) if kind == VOCAB else hf_shapes[hf_names[0]]
            out.append(ModelTensor(mname, hf_names, kind, dims))
    return out


def _layer_shape(kind: str, hf_names: tuple[str, ...], hf_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    first = hf_shapes[hf_names[0]]
    if kind in (QKV, FC1):  # stacked on rows
        return (sum(hf_shapes[n][0] for n in hf_names), *first[1:])
    return first


def extra_state_keys(shape: GPTShape) -> list[str]:
    """The unique keys of the per-layer ``_extra_state`` objects (Megatron's ShardedObject naming)."""
    L = shape.num_layers
    return [f"{LAYER_PREFIX}{module}._extra_state/shard_{i}_{L}" for i in range(L) for module in EXTRA_STATE_MODULES]


def describe_config(hf_config: Any) -> str:
    """The config fields that decide tensor shapes, for error messages."""
    fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    return ", ".join(f"{f}={getattr(hf_config, f, None)}" for f in fields)
