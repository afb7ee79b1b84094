"""Stream a Megatron model replica's weights into a rollout engine as full, HF-named tensors.

Every rank of a model replica (its TP x PP ranks) runs :class:`WeightSync` collectively. Per
parameter, in the plan's order: the TP ranks of the stage that owns it cast their shard to the engine
dtype and gather it to their TP rank 0, which un-fuses it with the checkpoint map (per-group QKV,
gate/up, vocabulary padding cut) and, on a later stage, sends the HF tensors to stage 0. **Rank 0 of
each replica (tp_rank 0, pp_rank 0) feeds the engine**: it collects the tensors into buckets of at most
``bucket_bytes`` that keep every fused group whole and hands each to ``engine.load_weights``. With data
parallelism each replica feeds its own engine. Tensors move on the current device (CUDA with NCCL, CPU
with gloo).

    sync = WeightSync(model, hf_config)          # once; the plan is computed here (collective)
    stats = sync.push(engine)                    # after every optimizer step (collective)
    sync.check(engine)                           # opt-in: engine weights == trainer weights (collective)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl.checkpoint.qwen2 import VOCAB, _check_same, _from_shards, _stage_names, _to_shard
from megatron_rl.megatron.model import GPTShape
from megatron_rl.megatron.optim import unwrap_ddp
from megatron_rl.megatron.parallel import pipeline_parallel_group, tensor_parallel_group
from megatron_rl.weight_sync.plan import DEFAULT_BUCKET_BYTES, Entry, Plan, build_plan

__all__ = ["WeightSync"]

Tensor = torch.Tensor
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

    Raises:
        KeyError: the model's parameter names differ from the checkpoint map's (named in the message).
        ValueError: ``bucket_bytes`` is not positive.
    """

    def __init__(self, model: torch.nn.Module, hf_config: Any, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype = torch.float32) -> None:
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

    def _shard_shapes(self, shape: GPTShape) -> list[dict[str, tuple[int, ...]]]:
        """Every stage's parameter shapes on one TP rank: each stage broadcasts its own over PP."""
        _check_same(set(self.params), set(_stage_names(shape, self.pp_rank, self.pp_size)),
                    f"Megatron stage {self.pp_rank}", "qwen2 map")
        stages = []
        for stage in range(self.pp_size):
            names = sorted(_stage_names(shape, stage, self.pp_size))
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

    # -- streaming --------------------------------------------------------------------------------

    def buckets(self) -> Iterator[Bucket]:
        """Yield the buckets of one sync (collective: every rank of the replica must drain it).

        On the rank that feeds the engine each bucket is a list of ``(hf_name, full tensor)`` in the
        engine dtype, on the current device; on the other ranks each bucket is an empty list (the same
        number of buckets everywhere).
        """
        entries = self.plan.entries
        for indices in self.plan.buckets:
            bucket: Bucket = []
            for index in indices:
                tensors = self._export(entries[index])
                if self.feeds_engine:
                    bucket.extend(zip(entries[index].hf_names, tensors, strict=True))
            yield bucket

    @torch.no_grad()
    def _export(self, entry: Entry) -> list[Tensor] | None:
        """The HF tensors of one entry on the feeding rank (None elsewhere)."""
        tensors = None
        if self.pp_rank == entry.stage:
            shard = self.params[entry.megatron_name].detach().to(device=self.device, dtype=self.plan.dtype)
            parts = self._gather_tp(shard.contiguous())
            if parts is not None:
                tensors = _from_shards(self.plan.shape, entry.kind, parts)
        if entry.stage != 0 and self.tp_rank == 0:
            if self.pp_rank == entry.stage:
                for tensor in tensors:
                    dist.send(tensor.contiguous(), group=self.pp_group, group_dst=0)
            elif self.pp_rank == 0:
                tensors = self._empty_like_hf(entry)
                for tensor in tensors:
                    dist.recv(tensor, group=self.pp_group, group_src=entry.stage)
        return tensors if self.feeds_engine else None

    def _gather_tp(self, shard: Tensor) -> list[Tensor] | None:
        """This stage's TP shards of one parameter on TP rank 0 (None on the others).

        Point-to-point rather than ``dist.gather``: on gloo a gather moved 0.1-0.2 GB/s here, send/recv
        0.5-0.9 GB/s; NCCL runs both as the same peer-to-peer transfers.
        """
        if self.tp_size == 1:
            return [shard]
        if self.tp_rank != 0:
            dist.send(shard, group=self.tp_group, group_dst=0)
            return None
        parts = [shard] + [torch.empty_like(shard) for _ in range(1, self.tp_size)]
        requests = [dist.irecv(part, group=self.tp_group, group_src=i) for i, part in enumerate(parts) if i]
        for request in requests:
            request.wait()
        return parts

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
        for bucket in self.buckets():
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
