"""Stream a Megatron model replica's weights into a rollout engine as full, HF-named tensors.

Every rank of a model replica (its TP x PP ranks) runs :class:`WeightSync` collectively. Per
parameter, in the plan's order: the TP ranks of the stage that owns it gather their shards to their TP
rank 0, which un-fuses them the way the checkpoint map does (per-group QKV, gate/up, vocabulary padding
cut; the plan turns the map into slice copies, :class:`~megatron_rl.weight_sync.plan.Piece`), casts them
to the engine dtype and, on a later stage, sends the HF tensors to stage 0. **Rank 0 of each replica
(tp_rank 0, pp_rank 0) feeds the engine**: it collects the tensors into buckets of at most
``bucket_bytes`` that keep every fused group whole and hands each to ``engine.load_weights``. With data
parallelism each replica feeds its own engine. Tensors move on the current device (CUDA with NCCL, CPU
with gloo); on CPU the TP ranks of one host instead copy their slices straight into a bucket-sized
shared-memory buffer. A push hands the engine views of the trainer's parameters where an HF tensor is
one slice of them and otherwise buffers kept across pushes, so after the first push it allocates nothing.

    sync = WeightSync(model, hf_config)          # once; the plan is computed here (collective)
    stats = sync.push(engine)                    # after every optimizer step (collective)
    sync.check(engine)                           # opt-in: engine weights == trainer weights (collective)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl.checkpoint.qwen2 import LAYER_NAMINGS, VOCAB, _check_same, _stage_names, _to_shard, layer_spec_of
from megatron_rl.megatron.model import GPTShape
from megatron_rl.megatron.optim import unwrap_ddp
from megatron_rl.megatron.parallel import pipeline_parallel_group, tensor_parallel_group
from megatron_rl.weight_sync.plan import DEFAULT_BUCKET_BYTES, Entry, Piece, Plan, build_plan

__all__ = ["WeightSync"]

Tensor = torch.Tensor
_SHM_DIR = "/dev/shm"
Bucket = list[tuple[str, Tensor]]


class WeightSync:
    """The trainer-to-engine weight hand-off of one model replica.

    Args:
        model: this rank's GPTModel stage (a Megatron DDP wrapper is unwrapped), built by
            :func:`megatron_rl.megatron.model.build_gpt_model` after
            :func:`megatron_rl.megatron.parallel.init_parallel`.
        hf_config: the HF config the model was built from.
        bucket_bytes: most bytes per ``load_weights`` call (default 512 MiB). A fused group (q/k/v
            weights and biases of a layer, gate/up of an MLP) is never split, and a tensor or group
            larger than this is sent alone.
        dtype: the engine's weight dtype; tensors are cast to it before they travel.
        shared_memory: on CPU with TP > 1, gather the TP shards through shared memory when the TP ranks
            share a host (see :meth:`_open_shared`; falls back to the process group otherwise). False:
            always through the process group (as with CUDA).

    The model may have the local spec's or Transformer Engine's parameter names
    (:func:`~megatron_rl.checkpoint.qwen2.layer_spec_of`); the engine gets HF names either way.

    Raises:
        KeyError: the model's parameter names differ from the checkpoint map's (named in the message).
        ValueError: ``bucket_bytes`` is not positive, or the pipeline stages use different layer names.
    """

    def __init__(self, model: torch.nn.Module, hf_config: Any, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype = torch.float32, shared_memory: bool = True) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
        self.params = {name: p for name, p in unwrap_ddp(model).named_parameters()}
        self.tp_group, self.pp_group = tensor_parallel_group(), pipeline_parallel_group()
        self.tp_rank, self.tp_size = self.tp_group.rank(), self.tp_group.size()
        self.pp_rank, self.pp_size = self.pp_group.rank(), self.pp_group.size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.feeds_engine = self.tp_rank == 0 and self.pp_rank == 0
        shape = GPTShape.from_hf(hf_config)
        self.plan: Plan = build_plan(shape, self._shard_shapes(shape), tp_size=self.tp_size, dtype=dtype,
                                     bucket_bytes=bucket_bytes)
        self._arena = _Arena(dtype, self.device)
        self._shared_offsets, self._shared_numel = self._shared_layout()
        self._shared = self._open_shared() if shared_memory else None

    def _shard_shapes(self, shape: GPTShape) -> list[dict[str, tuple[int, ...]]]:
        """Every stage's parameter shapes on one TP rank: each stage broadcasts its own over PP."""
        naming = self._layer_naming()
        _check_same(set(self.params), set(_stage_names(shape, self.pp_rank, self.pp_size, naming)),
                    f"Megatron stage {self.pp_rank}", f"qwen2 map ({naming} layer names)")
        stages = []
        for stage in range(self.pp_size):
            names = sorted(_stage_names(shape, stage, self.pp_size, naming))
            table = torch.zeros((len(names), 3), dtype=torch.int64, device=self.device)  # ndim, d0, d1
            if stage == self.pp_rank:
                for row, name in enumerate(names):
                    dims = self.params[name].shape
                    if not 1 <= len(dims) <= 2:
                        raise ValueError(f"{name} has shape {tuple(dims)}; the weight sync handles 1-D and 2-D")
                    table[row, : len(dims) + 1] = torch.tensor([len(dims), *dims])
            if self.pp_size > 1:
                dist.broadcast(table, group=self.pp_group, group_src=stage)
            stages.append({n: tuple(r[1 : 1 + r[0]]) for n, r in zip(names, table.tolist(), strict=True)})
        return stages

    def _layer_naming(self) -> str:
        """This stage's layer naming ("local" or "te"), checked to be every stage's (the shape tables
        that the stages broadcast are laid out by name)."""
        naming = layer_spec_of(self.params)
        if self.pp_size > 1:
            code = float(LAYER_NAMINGS.index(naming))
            extremes = torch.tensor([code, -code], device=self.device)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.pp_group)
            if extremes[0].item() != -extremes[1].item():
                raise ValueError(f"pipeline stages use different layer names (stage {self.pp_rank}: {naming!r}); "
                                 "build every stage with the same layer_spec")
        return naming

    @property
    def shared_memory(self) -> bool:
        """Whether this rank's TP group gathers shards through shared memory (see :meth:`_open_shared`)."""
        return self._shared is not None

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the buffers this rank keeps between syncs (reused buffers and its shared-memory mapping)."""
        shared = 0 if self._shared is None else self._shared.numel() * self._shared.element_size()
        return shared + sum(chunk.numel() * chunk.element_size() for chunk in self._arena.chunks)

    # -- streaming --------------------------------------------------------------------------------

    def buckets(self, *, reuse: bool = False) -> Iterator[Bucket]:
        """Yield the buckets of one sync (collective: every rank of the replica must drain it).

        On the rank that feeds the engine each bucket is a list of ``(hf_name, full tensor)`` in the
        engine dtype, on the current device; on the other ranks each bucket is an empty list (the same
        number of buckets everywhere).

        Args:
            reuse: False: every tensor is freshly allocated and owned by the caller. True (for consumers
                that copy each bucket before drawing the next, like ``load_weights``): tensors are views
                of the trainer's parameters where an HF tensor is one slice of them, and otherwise live in
                buffers kept across syncs (:class:`_Arena`), so a sync after the first allocates nothing;
                they are valid only until the next bucket is drawn.
        """
        entries = self.plan.entries
        arena = self._arena if reuse else None
        for indices in self.plan.buckets:
            bucket_arena = arena or _Arena(self.plan.dtype, self.device)
            bucket_arena.reset()
            if self._shared is not None:
                self._write_shared(indices)
            bucket: Bucket = []
            for index in indices:
                tensors = self._export(entries[index], bucket_arena, views=reuse)
                if self.feeds_engine:
                    bucket.extend(zip(entries[index].hf_names, tensors, strict=True))
            yield bucket
            if self._shared is not None:
                dist.barrier(group=self.tp_group)  # TP rank 0 is done with this bucket's shared buffer

    @torch.no_grad()
    def _export(self, entry: Entry, arena: _Arena, *, views: bool) -> list[Tensor] | None:
        """The HF tensors of one entry on the feeding rank (None elsewhere)."""
        tensors = None
        if self.pp_rank == entry.stage and self._shared is not None:
            tensors = self._from_shared(entry)
            if tensors is not None and not views:
                tensors = [tensor.clone() for tensor in tensors]
        elif self.pp_rank == entry.stage:
            parts = self._gather_tp(entry, arena)
            if parts is not None:
                tensors = [self._assemble(piece, parts, hf_shape, arena, views)
                           for piece, hf_shape in zip(entry.pieces, entry.hf_shapes, strict=True)]
        if entry.stage != 0 and self.tp_rank == 0:
            if self.pp_rank == entry.stage:
                for tensor in tensors:
                    dist.send(tensor, group=self.pp_group, group_dst=0)
            elif self.pp_rank == 0:
                tensors = [arena.take(shape) for shape in entry.hf_shapes]
                for tensor in tensors:
                    dist.recv(tensor, group=self.pp_group, group_src=entry.stage)
        return tensors if self.feeds_engine else None

    def _gather_tp(self, entry: Entry, arena: _Arena) -> list[Tensor | None] | None:
        """This stage's TP shards of one parameter on TP rank 0, indexed by TP rank (None on the other
        ranks). Rank 0's own shard is its parameter as is; a shard no HF tensor takes from is not sent.

        Point-to-point rather than ``dist.gather``: on gloo a gather moved 0.1-0.2 GB/s here, send/recv
        0.5-0.9 GB/s; NCCL runs both as the same peer-to-peer transfers.
        """
        own = self.params[entry.megatron_name].detach()
        used = entry.shards_used
        if self.tp_rank != 0:
            if self.tp_rank in used:
                dist.send(own.to(device=self.device, dtype=self.plan.dtype).contiguous(), group=self.tp_group,
                          group_dst=0)
            return None
        parts: list[Tensor | None] = [own] + [arena.take(entry.shard_shape) if i in used else None
                                              for i in range(1, self.tp_size)]
        requests = [dist.irecv(part, group=self.tp_group, group_src=i) for i, part in enumerate(parts)
                    if i and part is not None]
        for request in requests:
            request.wait()
        return parts

    # -- shared-memory TP gather (CPU) ---------------------------------------------------------------

    def _shared_layout(self) -> tuple[dict[tuple[str, int], int], int]:
        """Element offset of every HF tensor of this stage within its bucket's shared buffer, keyed by
        (Megatron name, index among its HF tensors), and the largest bucket (elements). Left out: an HF
        tensor that is one contiguous slice of TP rank 0's shard (rank 0 hands that slice on as is)."""
        offsets: dict[tuple[str, int], int] = {}
        largest = 1
        for indices in self.plan.buckets:
            offset = 0
            for index in indices:
                entry = self.plan.entries[index]
                if entry.stage != self.pp_rank:
                    continue
                for i, (piece, hf_shape) in enumerate(zip(entry.pieces, entry.hf_shapes, strict=True)):
                    if not self._is_rank0_slice(entry, piece):
                        offsets[(entry.megatron_name, i)] = offset
                        offset += math.prod(hf_shape)
            largest = max(largest, offset)
        return offsets, largest

    def _is_rank0_slice(self, entry: Entry, piece: Piece) -> bool:
        """Whether HF tensor ``piece`` is one contiguous slice of TP rank 0's shard, in the engine dtype."""
        if piece.single is None or piece.single[0] != 0 or self.params[entry.megatron_name].dtype != self.plan.dtype:
            return False
        _, start, length = piece.single
        return piece.dim == 0 or (start == 0 and length == entry.shard_shape[piece.dim])

    def _open_shared(self) -> Tensor | None:
        """Shared memory in which the TP ranks of a CPU stage assemble each bucket's HF tensors.

        TP rank 0 maps a file in /dev/shm as large as this stage's largest bucket; the other TP ranks map
        the same file, then it is unlinked (the mappings stay). Each rank then copies the slices of its
        own shard straight into place (half the bytes each at TP=2, in parallel) instead of sending them
        through gloo's loopback TCP (0.5-0.9 GB/s here) to be copied again by rank 0. Returns the mapping,
        or None (the gloo path is used): not on CPU, TP=1, or a rank could not create or find the file
        (e.g. TP ranks on different hosts).
        """
        if self.device.type != "cpu" or self.tp_size == 1 or not os.path.isdir(_SHM_DIR):
            return None
        token = torch.tensor([int.from_bytes(os.urandom(6), "little")])
        dist.broadcast(token, group=self.tp_group, group_src=0)
        path = os.path.join(_SHM_DIR, f"megatron_rl_weight_sync_{token.item():x}")
        shared, ok = None, torch.ones(1)
        try:
            if self.tp_rank == 0:
                shared = torch.from_file(path, shared=True, size=self._shared_numel, dtype=self.plan.dtype)
            dist.barrier(group=self.tp_group)
            if self.tp_rank != 0:
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path} (TP rank 0's shared buffer) is not on this host")
                shared = torch.from_file(path, shared=True, size=self._shared_numel, dtype=self.plan.dtype)
        except (OSError, RuntimeError):
            ok.zero_()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.tp_group)
        if self.tp_rank == 0 and os.path.exists(path):
            os.unlink(path)
        return shared if ok.item() else None

    @torch.no_grad()
    def _write_shared(self, indices: tuple[int, ...]) -> None:
        """Every TP rank copies (and casts) the slices of its own shards into this bucket's HF tensors in
        the shared buffer; then the TP group meets, so rank 0 reads complete tensors."""
        for index in indices:
            entry = self.plan.entries[index]
            if entry.stage != self.pp_rank:
                continue
            own = self.params[entry.megatron_name].detach()
            for i, piece in enumerate(entry.pieces):
                out = self._shared_tensor(entry, i)
                for shard, start, offset, length in piece.segments if out is not None else ():
                    if shard == self.tp_rank:
                        out.narrow(piece.dim, offset, length).copy_(own.narrow(piece.dim, start, length))
        dist.barrier(group=self.tp_group)

    def _shared_tensor(self, entry: Entry, i: int) -> Tensor | None:
        """HF tensor ``i`` of ``entry`` in the shared buffer (None when rank 0 hands on its own slice)."""
        start = self._shared_offsets.get((entry.megatron_name, i))
        if start is None:
            return None
        shape = entry.hf_shapes[i]
        return self._shared[start : start + math.prod(shape)].view(shape)

    def _from_shared(self, entry: Entry) -> list[Tensor] | None:
        """On TP rank 0, after :meth:`_write_shared`: the HF tensors of ``entry`` (None elsewhere)."""
        if self.tp_rank != 0:
            return None
        own = self.params[entry.megatron_name].detach()
        tensors = []
        for i, piece in enumerate(entry.pieces):
            tensor = self._shared_tensor(entry, i)
            if tensor is None:
                _, start, length = piece.single
                tensor = own.narrow(piece.dim, start, length)
            tensors.append(tensor)
        return tensors

    def _assemble(self, piece: Piece, parts: list[Tensor | None], hf_shape: tuple[int, ...], arena: _Arena,
                  views: bool) -> Tensor:
        """One HF tensor from the TP shards: the slice itself when ``views`` and it is one contiguous slice
        of a shard in the engine dtype, otherwise its slices copied (and cast) into ``arena``."""
        if views and piece.single is not None:
            shard, start, length = piece.single
            view = parts[shard].narrow(piece.dim, start, length)
            if view.dtype == self.plan.dtype and view.device == self.device and view.is_contiguous():
                return view
        out = arena.take(hf_shape)
        for shard, start, offset, length in piece.segments:
            out.narrow(piece.dim, offset, length).copy_(parts[shard].narrow(piece.dim, start, length))
        return out

    def push(self, engine: Any) -> dict[str, float]:
        """Send the current weights to ``engine`` (collective over the replica).

        Args:
            engine: the :class:`~megatron_rl.rollout.base.RolloutEngine` this replica feeds, on the rank
                that feeds it (tp_rank 0, pp_rank 0); None on every other rank.

        Returns:
            ``{"seconds": wall time of the whole push, "load_seconds": the part spent in
            ``engine.load_weights``, "bytes": bytes loaded, "buckets": load_weights calls}`` (all floats;
            the last three count on the feeding rank and are 0 elsewhere).

        Raises:
            ValueError: ``engine`` is None on the feeding rank or given on another rank.
        """
        self._check_engine_arg(engine)
        start = time.perf_counter()
        num_bytes = num_buckets = load_seconds = 0.0
        for bucket in self.buckets(reuse=True):
            if bucket:
                load_start = time.perf_counter()
                engine.load_weights(bucket)
                load_seconds += time.perf_counter() - load_start
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                num_buckets += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start, "load_seconds": load_seconds, "bytes": num_bytes,
                "buckets": num_buckets}

    def _check_engine_arg(self, engine: Any) -> None:
        if self.feeds_engine and engine is None:
            raise ValueError("engine=None on the rank that feeds the engine (tp_rank 0, pp_rank 0 of the replica)")
        if not self.feeds_engine and engine is not None:
            raise ValueError(f"engine given on tp_rank={self.tp_rank}, pp_rank={self.pp_rank}; only tp_rank 0, "
                             "pp_rank 0 of each replica feeds one (pass None elsewhere)")

    # -- exact check --------------------------------------------------------------------------------

    @torch.no_grad()
    def check(self, engine: Any) -> None:
        """Check that every weight the engine computes with equals the trainer's (collective).

        The feeding rank reads the engine's weights (``engine.engine_weights()``: HF-named, read through
        the engine's own GEMMs, see :meth:`~megatron_rl.rollout.vllm_engine.VLLMEngine.engine_weights`)
        and sends each to the stage that owns it; there it is sharded again with the checkpoint map's
        HF -> Megatron direction (not the export path) and compared with every TP rank's parameter, in
        the engine dtype (bitwise for fp32). Vocabulary padding rows are not compared (the engine has
        none). With tied embeddings the engine's LM head is compared with the embedding (PP=1) or the
        last stage's copy of it (PP>1).

        Raises:
            ValueError: on every rank of the replica, naming the first HF tensor (in stream order) that
                differs and the largest absolute difference, or the names the engine has or lacks.
        """
        self._check_engine_arg(engine)
        readable = not self.feeds_engine or hasattr(engine, "engine_weights")
        weights = engine.engine_weights() if self.feeds_engine and readable else {}
        self._check_names(weights, readable)
        checks = [(entry, entry.hf_names) for entry in self.plan.entries]
        if self.plan.shape.tied_embeddings:
            embedding = next(e for e in self.plan.entries if e.kind == VOCAB)
            checks.append((self.plan.tied_copy or embedding, ("lm_head.weight",)))
        diffs = torch.full((len(checks), 3), -1.0, dtype=torch.float64, device=self.device)
        for row, (entry, names) in enumerate(checks):
            tensors = self._to_owner(entry, [weights[n] for n in names] if self.feeds_engine else None)
            if tensors is not None:
                diffs[row, : len(names)] = torch.tensor(self._shard_diffs(entry, tensors), dtype=torch.float64)
        for group in (self.tp_group, self.pp_group):
            dist.all_reduce(diffs, op=dist.ReduceOp.MAX, group=group)
        for (entry, names), row in zip(checks, diffs.tolist(), strict=True):
            for name, diff in zip(names, row, strict=False):
                if diff != 0.0:
                    raise ValueError(f"engine weight {name} differs from the trainer's ({entry.megatron_name} on "
                                     f"pipeline stage {entry.stage}): max |diff| = {diff:.3e}")

    def _check_names(self, weights: dict[str, Tensor], readable: bool) -> None:
        """Raise on every rank when the engine cannot be read or its tensor names are not the plan's."""
        expected = set(self.plan.hf_names) | ({"lm_head.weight"} if self.plan.shape.tied_embeddings else set())
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        bad = torch.tensor([float(self.feeds_engine and bool(missing or extra))], device=self.device)
        for group in (self.tp_group, self.pp_group):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        if bad.item():
            if not self.feeds_engine:
                detail = "see the rank that feeds the engine"
            elif not readable:
                detail = "the engine has no engine_weights() to read them back (VLLMEngine has)"
            else:
                detail = f"missing {missing[:5]}, unexpected {extra[:5]}"
            raise ValueError(f"cannot check the engine's weights: {detail}")

    def _to_owner(self, entry: Entry, tensors: list[Tensor] | None) -> list[Tensor] | None:
        """Full HF tensors from the feeding rank to every TP rank of ``entry``'s stage (None elsewhere)."""
        dtype = self.plan.dtype
        if self.feeds_engine:
            tensors = [t.to(device=self.device, dtype=dtype).contiguous() for t in tensors]
        if entry.stage != 0 and self.tp_rank == 0:
            if self.pp_rank == 0:
                for tensor in tensors:
                    dist.send(tensor, group=self.pp_group, group_dst=entry.stage)
            elif self.pp_rank == entry.stage:
                tensors = self._empty_like_hf(entry)
                for tensor in tensors:
                    dist.recv(tensor, group=self.pp_group, group_src=0)
        if self.pp_rank != entry.stage:
            return None
        if self.tp_size > 1:
            if self.tp_rank != 0:
                tensors = self._empty_like_hf(entry)
            for tensor in tensors:
                dist.broadcast(tensor, group=self.tp_group, group_src=0)
        return tensors

    def _empty_like_hf(self, entry: Entry) -> list[Tensor]:
        return [torch.empty(s, dtype=self.plan.dtype, device=self.device) for s in entry.hf_shapes]

    def _shard_diffs(self, entry: Entry, tensors: list[Tensor]) -> list[float]:
        """Max |trainer shard - engine tensors resharded| per HF tensor of ``entry`` (inf for NaN)."""
        local = self.params[entry.megatron_name].detach().to(device=self.device, dtype=self.plan.dtype)
        expected = self._reshard(entry, tensors)
        rows = self._valid_rows(entry, local)
        if torch.equal(local[:rows], expected[:rows]):
            return [0.0] * len(tensors)
        owner = self._reshard(entry, [torch.full_like(t, float(i)) for i, t in enumerate(tensors)])[:rows]
        error = (local[:rows] - expected[:rows]).abs().nan_to_num(nan=float("inf"))
        return [error[owner == i].max().item() if (owner == i).any() else 0.0 for i in range(len(tensors))]

    def _reshard(self, entry: Entry, tensors: list[Tensor]) -> Tensor:
        """This TP rank's Megatron shard of full HF tensors, through the checkpoint map."""
        vocab = entry.shard_shape[0] * self.tp_size
        return _to_shard(self.plan.shape, entry.kind, tensors, self.tp_rank, self.tp_size, vocab)

    def _valid_rows(self, entry: Entry, local: Tensor) -> int:
        """Rows of this shard that hold real (not padding) vocabulary for VOCAB entries; all rows otherwise."""
        if entry.kind != VOCAB:
            return local.shape[0]
        rows = local.shape[0]
        return max(0, min(rows, self.plan.shape.vocab_size - self.tp_rank * rows))


class _Arena:
    """Bump allocation from buffers kept across syncs.

    Every sync takes the same shapes in the same order, so after the first one :meth:`take` hands out
    memory that is already mapped: nothing is allocated and no fresh page is faulted in (a copy into
    fresh memory cost 7-10x one into touched memory on CPU here). :meth:`reset` starts over (per bucket).
    """

    CHUNK_BYTES = 64 << 20

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.chunks: list[Tensor] = []
        self.index = self.offset = 0

    def reset(self) -> None:
        self.index = self.offset = 0

    def take(self, shape: tuple[int, ...]) -> Tensor:
        """An uninitialised tensor of ``shape``, valid until the next :meth:`reset`."""
        numel = math.prod(shape)
        while True:
            if self.index == len(self.chunks):
                size = max(numel, self.CHUNK_BYTES // self.dtype.itemsize)
                self.chunks.append(torch.empty(size, dtype=self.dtype, device=self.device))
            chunk = self.chunks[self.index]
            if self.offset + numel <= chunk.numel():
                self.offset += numel
                return chunk[self.offset - numel : self.offset].view(shape)
            self.index, self.offset = self.index + 1, 0
