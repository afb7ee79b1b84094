"""Per-token logprobs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds the logits of a contiguous vocabulary slice ``[rank * V_local, (rank + 1) * V_local)``
of the padded vocabulary. Three all-reduces over the TP group give the exact softmax statistics:

    m      = max_v z_v                       (all-reduce MAX; a constant for autograd)
    S      = sum_v exp(z_v - m)              (all-reduce SUM)
    z_t    = z at the target token           (all-reduce SUM; zero on ranks not holding the target)
    logprob = z_t - m - log S
    entropy = log S - sum_v exp(z_v - m) (z_v - m) / S      (the last sum also all-reduced)

with ``z = logits / temperature`` (the rollout engine's tempered distribution). Columns at or beyond
``vocab_size`` (the padding Megatron adds to the HF vocabulary) are dropped before any of this, so
they never enter the partition function. The SUM all-reduces are differentiable (forward: sum over
ranks; backward: identity, since every TP rank computes the same loss from the reduced value).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["LogprobsAndEntropy", "vocab_parallel_logprobs"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in forward; identity in backward (the loss is replicated over the group)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return tensor if group is None else _AllReduceSum.apply(tensor, group)


class LogprobsAndEntropy(tuple):
    """``(logprobs, entropy)``, both shaped like ``targets``; entropy is None unless requested."""

    @property
    def logprobs(self) -> torch.Tensor:
        return self[0]

    @property
    def entropy(self) -> torch.Tensor | None:
        return self[1]


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    with_entropy: bool = False,
) -> LogprobsAndEntropy:
    """Log-probabilities of ``targets`` (and optionally the entropy) under ``softmax(logits / temperature)``.

    Args:
        logits: this TP rank's vocabulary slice, ``(..., V_local)``; any float dtype (computed in fp32).
        targets: token ids in the full (unpadded) vocabulary, shape ``logits.shape[:-1]``.
        vocab_size: the real (HF) vocabulary size; columns at or beyond it are padding and ignored.
        temperature: divide the logits by this first (must be > 0); use the rollout's temperature.
        tp_group: the tensor-parallel group; None means the logits hold the whole vocabulary.
        with_entropy: also return the per-position entropy of the tempered distribution (nats).

    Returns:
        ``(logprobs, entropy)`` in fp32, each shaped like ``targets`` (entropy None unless requested).

    Raises:
        ValueError: ``temperature <= 0``, mismatched shapes, or a target id outside ``[0, vocab_size)``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != logits shape without vocab {tuple(logits.shape[:-1])}"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(f"target ids must lie in [0, vocab_size={vocab_size}); got [{int(targets.min())}, "
                         f"{int(targets.max())}]")
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    local_vocab = logits.shape[-1]
    vocab_start = tp_rank * local_vocab
    num_valid = max(0, min(local_vocab, vocab_size - vocab_start))  # drop padded columns
    z = logits[..., :num_valid].float() / temperature  # (..., num_valid)

    if num_valid:
        local_max = z.detach().max(dim=-1).values
    else:
        local_max = torch.full(targets.shape, float("-inf"), dtype=torch.float32, device=logits.device)
    if tp_group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = z - local_max.unsqueeze(-1)  # (..., num_valid), <= 0
    exp = shifted.exp()
    sum_exp = _sum(exp.sum(dim=-1), tp_group)  # S

    local_index = targets - vocab_start
    in_slice = (local_index >= 0) & (local_index < num_valid)
    if num_valid:
        gathered = shifted.gather(-1, local_index.clamp(0, num_valid - 1).unsqueeze(-1)).squeeze(-1)
        target_shifted = torch.where(in_slice, gathered, torch.zeros_like(gathered))
    else:
        target_shifted = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    target_shifted = _sum(target_shifted, tp_group)  # z_t - m
    log_sum_exp = sum_exp.log()
    logprobs = target_shifted - log_sum_exp

    entropy = None
    if with_entropy:
        weighted = _sum((exp * shifted).sum(dim=-1), tp_group)
        entropy = log_sum_exp - weighted / sum_exp
    return LogprobsAndEntropy((logprobs, entropy))
