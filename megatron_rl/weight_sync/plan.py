"""The conversion plan of a weight sync: which Megatron parameter becomes which HF tensors, and the buckets.

Pure code (no process groups): :class:`~megatron_rl.weight_sync.sync.WeightSync` computes the plan once
per model and streams every sync through it. The names, split kinds and layouts come from the checkpoint
map (:mod:`megatron_rl.checkpoint.qwen2`, one source of truth); this module only adds what streaming
needs: the HF shapes of every parameter (found by running the map's own un-sharding on meta tensors),
where each HF tensor's slices lie in the TP shards (the same un-sharding run on index tensors, so a sync
copies slices into place instead of concatenating and splitting), the fused groups that must travel
together, and bucket boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence

import torch

from megatron_rl.checkpoint.qwen2 import OUTPUT_LAYER, _check_same, _from_shards, _stage_names, layer_spec_of
from megatron_rl.megatron.model import GPTShape
from megatron_rl.rollout.vllm_engine import FUSED_GROUPS

__all__ = ["DEFAULT_BUCKET_BYTES", "Entry", "Piece", "Plan", "build_plan", "fused_key", "pack_buckets"]

DEFAULT_BUCKET_BYTES = 512 << 20
"""Bytes per bucket handed to the engine in one ``load_weights`` call (a larger unit goes alone)."""

_PROJ = re.compile(r"^(?P<prefix>.*\.)(?P<proj>[a-z_]+_proj)\.(?:weight|bias)$")


@dataclasses.dataclass(frozen=True)
class Piece:
    """Where the slices of one HF tensor come from in the TP shards of its parameter.

    The shards are joined along ``dim``; ``segments`` lists ``(shard, start in the shard, start in the HF
    tensor, length)`` runs along ``dim`` that fill the HF tensor in order (the other dimensions are
    taken whole). Found by running the checkpoint map's own un-sharding on index tensors.
    """

    dim: int
    segments: tuple[tuple[int, int, int, int], ...]

    @property
    def single(self) -> tuple[int, int, int] | None:
        """``(shard, start, length)`` when the HF tensor is one run of one shard (a slice of it), else None."""
        if len(self.segments) != 1:
            return None
        shard, start, _, length = self.segments[0]
        return shard, start, length


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Megatron parameter of the model replica and the full HF tensors it becomes.

    ``shard_shape`` is the shape on each TP rank of stage ``stage``; ``hf_shapes`` are the shapes of
    ``hf_names`` after the TP gather, un-fusing and vocabulary cut; ``pieces`` say where each comes from.
    """

    stage: int
    megatron_name: str
    hf_names: tuple[str, ...]
    kind: str
    shard_shape: tuple[int, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    pieces: tuple[Piece, ...]

    def num_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the HF tensors of this entry in ``dtype``."""
        return sum(_numel(s) for s in self.hf_shapes) * dtype.itemsize

    @functools.cached_property
    def shards_used(self) -> frozenset[int]:
        """The TP ranks whose shard any HF tensor of this entry takes from (only rank 0's when replicated)."""
        return frozenset(segment[0] for piece in self.pieces for segment in piece.segments)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a sync needs that does not change between syncs.

    ``entries`` lists the exported parameters in stream order (stage by stage, map order); with tied
    embeddings the last stage's copy of the embedding is left out (the engine ties its head to the
    embedding). ``tied_copy`` is that copy's entry (None without one), kept for the exact check.
    ``buckets`` holds indices into ``entries``; each bucket is one ``load_weights`` call.
    """

    shape: GPTShape
    tp_size: int
    pp_size: int
    dtype: torch.dtype
    bucket_bytes: int
    entries: tuple[Entry, ...]
    tied_copy: Entry | None
    buckets: tuple[tuple[int, ...], ...]

    @property
    def hf_names(self) -> list[str]:
        """Every HF tensor name a sync sends, in stream order."""
        return [name for entry in self.entries for name in entry.hf_names]

    @property
    def num_bytes(self) -> int:
        """Bytes one sync sends to the engine."""
        return sum(entry.num_bytes(self.dtype) for entry in self.entries)


def fused_key(hf_name: str) -> str:
    """The fused group an HF tensor belongs to in the engine (q/k/v weights and biases of one layer share
    one key, gate/up of one MLP another); any other tensor is its own group.

    Example: ``model.layers.3.self_attn.k_proj.bias`` -> ``model.layers.3.self_attn.q_proj+k_proj+v_proj``.
    """
    match = _PROJ.match(hf_name)
    group = next((g for g in FUSED_GROUPS if match and match["proj"] in g), None)
    return f"{match['prefix']}{'+'.join(group)}" if group else hf_name


def pack_buckets(unit_bytes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Greedy, order-keeping packing of units (each kept whole) into buckets of at most ``bucket_bytes``.

    A unit larger than ``bucket_bytes`` gets a bucket of its own. Returns lists of unit indices.

    Raises:
        ValueError: ``bucket_bytes`` is not positive or a unit size is negative.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, size in enumerate(unit_bytes):
        if size < 0:
            raise ValueError(f"unit {index} has a negative size {size}")
        if current and current_bytes + size > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    if current:
        buckets.append(current)
    return buckets


def build_plan(
    shape: GPTShape,
    shard_shapes: Sequence[Mapping[str, tuple[int, ...]]],
    *,
    tp_size: int,
    dtype: torch.dtype,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Plan:
    """The plan of a model replica from the shapes of its parameters.

    Args:
        shape: the model's numbers (``GPTShape.from_hf``).
        shard_shapes: ``shard_shapes[pp_rank]`` maps each Megatron parameter name of that stage to its
            shape on one TP rank (local or Transformer Engine names, the same on every stage).
        tp_size: tensor-parallel size of the replica.
        dtype: the engine's dtype (bucket sizes are counted in it).
        bucket_bytes: most bytes per bucket; fused groups and larger tensors are never split.

    Raises:
        KeyError: a stage's parameter names differ from the checkpoint map's (names them).
        ValueError: the stages do not all use the same layer naming (local or Transformer Engine).
    """
    pp_size = len(shard_shapes)
    namings = [layer_spec_of(shapes) for shapes in shard_shapes]
    if len(set(namings)) > 1:
        raise ValueError(f"pipeline stages use different layer names: {namings} (local / Transformer Engine)")
    entries: list[Entry] = []
    tied_copy = None
    for stage, shapes in enumerate(shard_shapes):
        names = _stage_names(shape, stage, pp_size, namings[stage])
        _check_same(set(shapes), set(names), f"Megatron stage {stage}", f"qwen2 map ({namings[stage]} layer names)")
        for mname, (hf_names, kind) in names.items():
            shard = tuple(shapes[mname])
            meta = [torch.empty(shard, device="meta")] * tp_size
            hf_shapes = tuple(tuple(t.shape) for t in _from_shards(shape, kind, meta))
            pieces = _pieces(shape, kind, shard, hf_shapes, tp_size)
            entry = Entry(stage, mname, hf_names, kind, shard, hf_shapes, pieces)
            if shape.tied_embeddings and mname == OUTPUT_LAYER[0]:
                tied_copy = entry  # the engine's head is its embedding: sent once, from stage 0
            else:
                entries.append(entry)
    units: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        units.setdefault(fused_key(entry.hf_names[0]), []).append(index)
    unit_list = list(units.values())
    sizes = [sum(entries[i].num_bytes(dtype) for i in unit) for unit in unit_list]
    buckets = tuple(
        tuple(i for u in bucket for i in unit_list[u]) for bucket in pack_buckets(sizes, bucket_bytes)
    )
    return Plan(shape, tp_size, pp_size, dtype, bucket_bytes, tuple(entries), tied_copy, buckets)


def _pieces(shape: GPTShape, kind: str, shard: tuple[int, ...], hf_shapes: Sequence[tuple[int, ...]],
            tp_size: int) -> tuple[Piece, ...]:
    """The :class:`Piece` of each HF tensor of a parameter: the map's ``_from_shards`` is run on shards
    that hold their own indices along one dimension (size 1 along the others); the first dimension whose
    indices come out with the HF shapes along it (and 1 elsewhere) is the one the shards are joined on.

    Raises:
        ValueError: no dimension works (the map moved elements within more than one dimension).
    """
    for dim, size in enumerate(shard):
        probe_shape = [1] * len(shard)
        probe_shape[dim] = size
        parts = [torch.arange(p * size, (p + 1) * size).reshape(probe_shape) for p in range(tp_size)]
        outs = _from_shards(shape, kind, parts)
        if all(_fits(o.shape, hf, shard, dim) for o, hf in zip(outs, hf_shapes, strict=True)):
            return tuple(Piece(dim, _segments(o.reshape(-1), size)) for o in outs)
    raise ValueError(f"cannot stream {kind} shards of shape {shard}: the map moves elements in more than one dim")


def _fits(out: torch.Size, hf: tuple[int, ...], shard: tuple[int, ...], dim: int) -> bool:
    return len(out) == len(hf) == len(shard) and all(
        (o == h) if d == dim else (o == 1 and h == s) for d, (o, h, s) in enumerate(zip(out, hf, shard)))


def _segments(ids: torch.Tensor, size: int) -> tuple[tuple[int, int, int, int], ...]:
    """Runs of consecutive indices within one shard: ``(shard, start in it, start in ids, length)``."""
    if ids.numel() == 0:
        return ()
    part = ids // size
    breaks = (torch.nonzero((ids[1:] != ids[:-1] + 1) | (part[1:] != part[:-1])).flatten() + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, ids.numel()]
    return tuple((int(part[a]), int(ids[a] % size), a, b - a) for a, b in zip(starts, ends, strict=True))


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
