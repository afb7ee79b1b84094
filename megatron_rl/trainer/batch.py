"""One step's rollouts as padded tensors, their micro-batches, and their trip across a model replica.

Sequences are prompt + response, right-padded to the longest one. Every (N, T-1) tensor is
aligned with the logprobs of ``input_ids[:, 1:]``: position ``t`` scores the token at ``t + 1``
given its prefix, so the response tokens of a sequence whose prompt has ``P`` tokens sit at
positions ``P - 1 .. P + R - 2``. Right padding needs no attention mask: causal attention never
lets a real token see the padding after it, and the padding is outside ``response_mask``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_rl.megatron.forward import split_rows
from megatron_rl.megatron.train_step import MicroBatch
from megatron_rl.rollout.base import Rollout

__all__ = ["RolloutBatch", "broadcast_batch", "make_micro_batches", "pack_rollouts", "padded_tokens"]


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """The rollouts of one step (on one data-parallel rank)."""

    input_ids: torch.Tensor  # (N, T) int64, prompt + response + padding
    response_mask: torch.Tensor  # (N, T-1) bool, True at the response tokens' positions
    rollout_logprobs: torch.Tensor  # (N, T-1) float32, the engine's logprobs there (0 elsewhere)
    rewards: torch.Tensor  # (N,) float32
    group_index: torch.Tensor  # (N,) int64, one id per prompt (responses to one prompt share it)
    truncated: torch.Tensor  # (N,) bool, cut at max_tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=-1)


def pack_rollouts(
    prompts: Sequence[Sequence[int]],
    rollouts: Sequence[Rollout],
    rewards: Sequence[float],
    *,
    pad_id: int,
) -> RolloutBatch:
    """Pad ``prompts[r.prompt_index] + r.token_ids`` of every rollout ``r`` into one batch."""
    if len(rollouts) != len(rewards):
        raise ValueError(f"{len(rollouts)} rollouts but {len(rewards)} rewards")
    if not rollouts:
        raise ValueError("no rollouts to pack")
    lengths = [len(prompts[r.prompt_index]) + len(r.token_ids) for r in rollouts]
    seq = max(lengths)
    input_ids = torch.full((len(rollouts), seq), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rollouts), seq - 1), dtype=torch.bool)
    logprobs = torch.zeros((len(rollouts), seq - 1), dtype=torch.float32)
    for row, rollout in enumerate(rollouts):
        prompt = prompts[rollout.prompt_index]
        start, end = len(prompt), len(prompt) + len(rollout.token_ids)
        input_ids[row, :start] = torch.tensor(prompt, dtype=torch.int64)
        input_ids[row, start:end] = torch.tensor(rollout.token_ids, dtype=torch.int64)
        mask[row, start - 1 : end - 1] = True
        logprobs[row, start - 1 : end - 1] = torch.tensor(rollout.logprobs, dtype=torch.float32)
    return RolloutBatch(
        input_ids=input_ids,
        response_mask=mask,
        rollout_logprobs=logprobs,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_index=torch.tensor([r.prompt_index for r in rollouts], dtype=torch.int64),
        truncated=torch.tensor([r.finish_reason == "length" for r in rollouts], dtype=torch.bool),
    )


def make_micro_batches(
    batch: RolloutBatch,
    rows: torch.Tensor,
    *,
    micro_batch_size: int,
    loss_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    max_tokens_per_micro_batch: int = 0,
) -> list[MicroBatch]:
    """The micro-batches of the rows ``rows`` (a mini-batch).

    ``max_tokens_per_micro_batch`` 0: ``micro_batch_size`` rows each, in the order of ``rows``, at the
    batch's full width T. > 0: the rows grouped by length
    (:func:`~megatron_rl.megatron.forward.token_budget_micro_batches`, lengths from the response mask),
    each micro-batch cut to its longest row and holding at most that many padded tokens (a row longer
    than the budget alone); ``micro_batch_size`` is not used. The loss and gradients are the same either
    way (:func:`~megatron_rl.megatron.train_step.train_step` normalises by global counts).

    ``loss_mask`` is the response mask with the rows left out of the loss (overlong filtering)
    cleared; ``advantages`` is per token, (N, T-1); ``old_logprobs`` None means on-policy (see
    :class:`~megatron_rl.megatron.train_step.MicroBatch`). The engine's logprobs ride along so the
    update reports the trainer-vs-engine gap."""
    groups, widths = split_rows(rows, batch.response_mask, micro_batch_size=micro_batch_size,
                                max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                                field="algorithm.micro_batch_size")
    out = []
    for chunk, width in zip(groups, widths, strict=True):
        targets = slice(0, width - 1)
        out.append(MicroBatch(
            input_ids=batch.input_ids[chunk, :width],
            response_mask=loss_mask[chunk, targets],
            old_logprobs=None if old_logprobs is None else old_logprobs[chunk, targets],
            advantages=advantages[chunk, targets],
            ref_logprobs=None if ref_logprobs is None else ref_logprobs[chunk, targets],
            rollout_logprobs=batch.rollout_logprobs[chunk, targets],
        ))  # fmt: skip
    return out


def padded_tokens(micro_batches: Sequence[MicroBatch]) -> int:
    """Tokens the micro-batches run through the model, padding included: sum of b x T."""
    return sum(mb.input_ids.numel() for mb in micro_batches)


_FIELDS = tuple(field.name for field in dataclasses.fields(RolloutBatch))
_DTYPES = {"input_ids": torch.int64, "response_mask": torch.bool, "rollout_logprobs": torch.float32,
           "rewards": torch.float32, "group_index": torch.int64, "truncated": torch.bool}


def broadcast_batch(batch: RolloutBatch | None, *, src: int, group: dist.ProcessGroup | None) -> RolloutBatch:
    """Send the batch that rank ``src`` holds to every rank of ``group`` (collective; tensors only,
    no pickling). Ranks other than ``src`` pass None. A group of one returns ``batch`` unchanged."""
    if group is None or dist.get_world_size(group) == 1:
        assert batch is not None
        return batch
    is_src = dist.get_rank() == src
    shape = torch.tensor(batch.input_ids.shape if is_src else (0, 0), dtype=torch.int64)
    dist.broadcast(shape, src=src, group=group)
    n, seq = shape.tolist()
    out = {}
    for name in _FIELDS:
        dims = {"input_ids": (n, seq), "response_mask": (n, seq - 1), "rollout_logprobs": (n, seq - 1)}.get(name, (n,))
        # bool tensors travel as uint8 (not every backend reduces/broadcasts bool)
        wire = torch.uint8 if _DTYPES[name] == torch.bool else _DTYPES[name]
        tensor = getattr(batch, name).to(wire).contiguous() if is_src else torch.empty(dims, dtype=wire)
        dist.broadcast(tensor, src=src, group=group)
        out[name] = tensor.to(_DTYPES[name])
    return RolloutBatch(**out)
