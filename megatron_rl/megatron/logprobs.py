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

Two entry points:

- :func:`vocab_parallel_logprobs` takes logits (any shape ``(..., V_local)``); autograd differentiates it.
- :func:`output_layer_logprobs` takes the last stage's final hidden states and the output weight and
  applies the output layer only at the positions asked for (the response tokens), ``chunk_size``
  tokens at a time (:class:`_ChunkedLinearLogprobs`): no more than one chunk's logits exist at once,
  in forward or backward (backward recomputes them), and the gradient reaches the hidden states and
  the output weight (or the tied embedding) through autograd as the output layer's own would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_LOGPROB_CHUNK_SIZE",
    "LogprobsAndEntropy",
    "chunked_linear_logprobs",
    "output_layer_logprobs",
    "vocab_parallel_logprobs",
]

DEFAULT_LOGPROB_CHUNK_SIZE = 1024
"""Tokens per chunk of :func:`output_layer_logprobs`. Each chunk holds two fp32 ``(chunk, V / tp)`` buffers
(plus the logits in the model dtype while they are cast): 2 x 1024 x 151,936 x 4 bytes = 1.16 GiB for
Qwen2.5's vocabulary at TP=1 (0.58 GiB at TP=2), against 18.6 GiB for all 16k response tokens of a
micro-batch of four 4k-token responses at once. A chunk's GEMM (1024 x hidden x V / tp) is still large
enough to run near a GPU's peak, and its softmax passes, which read and write those buffers, cost about
as much as the GEMM: smaller chunks save memory without saving time, larger ones cost memory without
buying speed."""


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
        logits: this TP rank's vocabulary slice, ``(..., V_local)``; any float dtype (computed in fp32, or
            in fp64 for fp64 logits).
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
    z = logits[..., :num_valid].to(_compute_dtype(logits.dtype)) / temperature  # (..., num_valid)

    if num_valid:
        local_max = z.detach().max(dim=-1).values
    else:
        local_max = torch.full(targets.shape, float("-inf"), dtype=z.dtype, device=logits.device)
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
        target_shifted = torch.zeros(targets.shape, dtype=z.dtype, device=logits.device)
    target_shifted = _sum(target_shifted, tp_group)  # z_t - m
    log_sum_exp = sum_exp.log()
    logprobs = target_shifted - log_sum_exp

    entropy = None
    if with_entropy:
        weighted = _sum((exp * shifted).sum(dim=-1), tp_group)
        entropy = log_sum_exp - weighted / sum_exp
    return LogprobsAndEntropy((logprobs, entropy))


def _vocab_slice(local_vocab: int, vocab_size: int, tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(vocab_start, num_valid)``: the first vocabulary id of this TP rank's slice and how many of its
    ``local_vocab`` rows are real (not padding)."""
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    vocab_start = tp_rank * local_vocab
    return vocab_start, max(0, min(local_vocab, vocab_size - vocab_start))


def _chunk_bounds(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    step = chunk_size if chunk_size > 0 else max(num_tokens, 1)
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and lower precisions (bf16, fp16); fp64 stays fp64 (exactness checks)."""
    return torch.promote_types(dtype, torch.float32)


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(hidden @ weight.T) / temperature`` in fp32, (c, num_valid): the output layer's GEMM in the model
    dtype (as ColumnParallelLinear computes it), then one fp32 buffer, scaled in place."""
    logits = hidden @ weight.t()
    z = logits.to(_compute_dtype(logits.dtype))
    if z.data_ptr() == logits.data_ptr():  # already fp32: scale in place, no second buffer
        return z.div_(temperature)
    del logits
    return z.div_(temperature)


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Logprobs and entropy of ``softmax(hidden @ weight.T / temperature)`` at ``targets``, one chunk of
    tokens at a time, forward and backward (see :func:`chunked_linear_logprobs`).

    Saved for backward: ``hidden`` (n, h), ``targets`` (n,), and per token ``shift = m + log S`` and the
    entropy (fp32, n each); the logits of a chunk are recomputed from them, with

        log p_v = z_v - shift,   dlogprob / dz_v = 1[v = target] - p_v,   dentropy / dz_v = -p_v (log p_v + H),

    and ``z = logits / temperature``. The gradient w.r.t. ``hidden`` is all-reduced over the TP group (each
    rank holds its vocabulary slice's share, as ColumnParallelLinear's backward does); the one w.r.t.
    ``weight`` is this rank's slice, returned in the weight's dtype (rows at or beyond ``vocab_size`` get
    zero) through autograd, so Megatron's DDP hooks add it to ``main_grad`` as they do the output
    layer's own.

    Memory per call (c = chunk rows, V = this rank's valid vocabulary rows, h = hidden size):
    forward: two fp32 (c, V) buffers (z, then exp(z)), the (c, V) logits in the model dtype only while
    they are cast; backward: two fp32 (c, V) buffers (log p / its gradient, p), then one fp32 and one
    model-dtype (c, V) (the logits' gradient); the weight's gradient (V_local, h) in the weight's dtype, or,
    with several chunks and a non-fp32 weight, an fp32 (V_local, h) accumulator plus a model-dtype (V, h)
    product per chunk and the final cast."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weight, targets, vocab_size, temperature, tp_group, chunk_size, with_entropy
    ):
        ctx.set_materialize_grads(False)
        num_tokens, device, dtype = hidden.shape[0], hidden.device, _compute_dtype(hidden.dtype)
        vocab_start, num_valid = _vocab_slice(weight.shape[0], vocab_size, tp_group)
        weight_valid = weight[:num_valid]
        local_targets = targets - vocab_start
        logprobs = torch.empty(num_tokens, dtype=dtype, device=device)
        entropy = torch.empty(num_tokens if with_entropy else 0, dtype=dtype, device=device)
        shift = torch.empty(num_tokens, dtype=dtype, device=device)  # m + log S
        for start, end in _chunk_bounds(num_tokens, chunk_size):
            z = _scaled_logits(hidden[start:end], weight_valid, temperature)  # (c, num_valid) fp32
            if num_valid:
                local_max = z.max(dim=-1).values
            else:
                local_max = torch.full((end - start,), float("-inf"), dtype=dtype, device=device)
            if tp_group is not None:
                dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
            z.sub_(local_max.unsqueeze(-1))  # shifted, <= 0
            target_shifted = _at_targets(z, local_targets[start:end])
            exp = z.exp()
            sums = [exp.sum(dim=-1), target_shifted]
            if with_entropy:
                sums.append(exp.mul_(z).sum(dim=-1))
            del exp, z
            totals = torch.stack(sums)  # (2 or 3, c): S, z_t - m, sum_v exp(z_v - m)(z_v - m)
            if tp_group is not None:
                dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=tp_group)
            log_sum_exp = totals[0].log()
            logprobs[start:end] = totals[1] - log_sum_exp
            if with_entropy:
                entropy[start:end] = log_sum_exp - totals[2] / totals[0]
            shift[start:end] = local_max + log_sum_exp
        ctx.save_for_backward(hidden, weight, targets, shift, entropy)
        ctx.vocab_size, ctx.temperature, ctx.tp_group, ctx.chunk_size = vocab_size, temperature, tp_group, chunk_size
        ctx.mark_non_differentiable(*(() if with_entropy else (entropy,)))
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):  # type: ignore[override]
        hidden, weight, targets, shift, entropy = ctx.saved_tensors
        if entropy.numel() == 0:
            grad_entropy = None
        none = (None,) * 6
        if grad_logprobs is None and grad_entropy is None:
            return (None, None, *none)
        temperature, tp_group = ctx.temperature, ctx.tp_group
        vocab_start, num_valid = _vocab_slice(weight.shape[0], ctx.vocab_size, tp_group)
        weight_valid = weight[:num_valid]
        local_targets = targets - vocab_start
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_hidden else None
        bounds = _chunk_bounds(hidden.shape[0], ctx.chunk_size)
        # The weight's gradient, (V_local, h), padding rows 0. One chunk: its GEMM writes it in the weight's
        # dtype. Several: they accumulate in fp32 (the same buffer when the weight is fp32), rounded once.
        grad_weight = None
        if want_weight:
            accumulate_dtype = _compute_dtype(weight.dtype) if len(bounds) > 1 else weight.dtype
            grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device)
        for start, end in bounds:
            hidden_chunk = hidden[start:end]
            z = _scaled_logits(hidden_chunk, weight_valid, temperature)
            z.sub_(shift[start:end].unsqueeze(-1))  # log p
            probs = z.exp()
            if grad_entropy is not None:  # dz = -p (g_l + g_e (log p + H)) [+ g_l at the target], in z's buffer
                z.add_(entropy[start:end].unsqueeze(-1)).mul_(grad_entropy[start:end].unsqueeze(-1))
                if grad_logprobs is not None:
                    z.add_(grad_logprobs[start:end].unsqueeze(-1))
                grad_z = z.mul_(probs).neg_()
            else:  # dz = -p g_l [+ g_l at the target], in probs' buffer
                grad_z = probs.mul_(grad_logprobs[start:end].neg().unsqueeze(-1))
            del z, probs  # grad_z holds the one buffer still needed
            if grad_logprobs is not None:
                chunk_targets = local_targets[start:end]
                in_slice = (chunk_targets >= 0) & (chunk_targets < num_valid)
                rows = torch.arange(end - start, device=grad_z.device)[in_slice]
                grad_z.index_put_((rows, chunk_targets[in_slice]), grad_logprobs[start:end][in_slice], accumulate=True)
            grad_logits = grad_z.div_(temperature).to(weight.dtype)  # (c, num_valid)
            del grad_z
            if want_hidden:
                torch.mm(grad_logits, weight_valid, out=grad_hidden[start:end])
            if want_weight:
                rows_valid = grad_weight[:num_valid]
                if grad_logits.dtype == grad_weight.dtype:
                    rows_valid.addmm_(grad_logits.t(), hidden_chunk)
                else:  # bf16 product, added to the fp32 accumulator
                    rows_valid.add_(grad_logits.t() @ hidden_chunk)
            del grad_logits
        if want_hidden and tp_group is not None:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=tp_group)
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)  # the same tensor unless accumulated in fp32
        return (grad_hidden, grad_weight, *none)


def _at_targets(shifted: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
    """``shifted[i, local_targets[i]]`` where the target lies in this rank's slice, else 0; (c,)."""
    num_valid = shifted.shape[-1]
    if not num_valid:
        return torch.zeros(local_targets.shape, dtype=shifted.dtype, device=shifted.device)
    in_slice = (local_targets >= 0) & (local_targets < num_valid)
    gathered = shifted.gather(-1, local_targets.clamp(0, num_valid - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(in_slice, gathered, torch.zeros_like(gathered))


def chunked_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
) -> LogprobsAndEntropy:
    """Logprobs of ``targets`` (and optionally the entropy) under ``softmax(hidden @ weight.T / temperature)``,
    ``chunk_size`` tokens at a time: the same numbers as :func:`vocab_parallel_logprobs` of the full logits
    (fp32 rounding apart), with at most one chunk's logits alive in forward and in backward.

    Args:
        hidden: (n, h) hidden states of the n positions to score, in the model dtype.
        weight: (V_local, h) this TP rank's rows of the (padded) output weight; rows at or beyond
            ``vocab_size`` are padding and ignored.
        targets: (n,) token ids in the full (unpadded) vocabulary.
        vocab_size, temperature, tp_group, with_entropy: as for :func:`vocab_parallel_logprobs`.
        chunk_size: tokens per chunk; 0 computes all n at once.

    Returns:
        ``(logprobs, entropy)``, (n,) fp32 each (entropy None unless requested); differentiable w.r.t.
        ``hidden`` and ``weight``.

    Raises:
        ValueError: ``temperature <= 0``, ``chunk_size < 0``, mismatched shapes, or a target id outside
            ``[0, vocab_size)``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 0 (0: all tokens at once)")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (n, h) and weight (V_local, h) must share h; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != (n,) = {tuple(hidden.shape[:1])}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(f"target ids must lie in [0, vocab_size={vocab_size}); got [{int(targets.min())}, "
                         f"{int(targets.max())}]")
    logprobs, entropy = _ChunkedLinearLogprobs.apply(hidden, weight, targets, vocab_size, float(temperature),
                                                     tp_group, chunk_size, with_entropy)
    return LogprobsAndEntropy((logprobs, entropy if with_entropy else None))


def output_layer_logprobs(
    hidden_states: torch.Tensor,
    output_weight: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    with_entropy: bool = False,
    mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
) -> LogprobsAndEntropy:
    """Logprobs (and optionally entropy) of ``input_ids[:, 1:]`` from the last stage's final hidden states,
    computed only where ``mask`` is True.

    The positions ``(b, t)`` with ``mask[b, t]`` are gathered from ``hidden_states`` (t scores the token at
    t + 1), and :func:`chunked_linear_logprobs` applies ``output_weight`` to them; nothing is computed at
    the other positions (prompt tokens, padding).

    Args:
        hidden_states: (T, b, h), Megatron's sequence-first layout, after the final norm.
        output_weight: (V_local, h) this TP rank's rows of the output layer's weight (the word embedding's
            when they are tied).
        input_ids: (b, T) the token ids of the micro-batch.
        mask: (b, T-1) bool, the positions to score; None scores every position.
        vocab_size, temperature, tp_group, with_entropy, chunk_size: see :func:`chunked_linear_logprobs`.

    Returns:
        ``(logprobs, entropy)``, each (b, T-1) fp32 and 0 where ``mask`` is False (entropy None unless
        requested).
    """
    seq, batch, _hidden = hidden_states.shape
    if tuple(input_ids.shape) != (batch, seq):
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} != (b, T) = {(batch, seq)} of the hidden states")
    input_ids = input_ids.to(hidden_states.device)
    if mask is None:
        mask = torch.ones(batch, seq - 1, dtype=torch.bool, device=hidden_states.device)
    elif tuple(mask.shape) != (batch, seq - 1):
        raise ValueError(f"mask shape {tuple(mask.shape)} != (b, T-1) = {(batch, seq - 1)}")
    rows, positions = mask.to(hidden_states.device, torch.bool).nonzero(as_tuple=True)  # row-major: b, then t
    selected = hidden_states.reshape(seq * batch, -1).index_select(0, positions * batch + rows)  # (n, h)
    result = chunked_linear_logprobs(selected, output_weight, input_ids[rows, positions + 1], vocab_size=vocab_size,
                                     temperature=temperature, tp_group=tp_group, with_entropy=with_entropy,
                                     chunk_size=chunk_size)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(batch, seq - 1).index_put((rows, positions), values)

    return LogprobsAndEntropy((scatter(result.logprobs), None if result.entropy is None else scatter(result.entropy)))
