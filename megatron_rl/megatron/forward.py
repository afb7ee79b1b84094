"""Teacher-forced per-token logprobs of a batch through Megatron's pipeline schedule (forward only)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.megatron.logprobs import LogprobsAndEntropy, vocab_parallel_logprobs
from megatron_rl.megatron.parallel import pipeline_parallel_group, tensor_parallel_group

__all__ = ["forward_logprobs"]


@torch.no_grad()
def forward_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    with_entropy: bool = False,
) -> LogprobsAndEntropy:
    """Logprobs (and optionally entropy) of ``input_ids[:, 1:]`` given their prefixes, on every rank.

    Runs Megatron's ``forward_backward_func`` with ``forward_only=True`` (no pipelining at PP=1, 1F1B at
    PP>1); the last pipeline stage computes vocab-parallel logprobs at ``temperature`` and broadcasts
    them to the other stages. Every rank of a model replica must call this with the same ``input_ids``.

    Args:
        model: this rank's GPTModel stage (see :func:`megatron_rl.megatron.model.build_gpt_model`).
        input_ids: (B, T) token ids, causal attention, positions 0..T-1 (no padding mask yet).
        vocab_size: the HF vocabulary size (padded logits are ignored).
        micro_batch_size: rows per micro-batch; must divide B. Default: B (one micro-batch).

    Returns:
        ``(logprobs, entropy)``, each (B, T-1) fp32; entropy None unless ``with_entropy``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = input_ids.shape
    micro_batch_size = micro_batch_size or batch
    if batch % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} does not divide the batch size {batch}")
    device = torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")
    input_ids = input_ids.to(device)
    micro_batches = iter(input_ids.split(micro_batch_size))
    tp_group = tensor_parallel_group()

    def forward_step(data_iterator, stage):
        ids = next(data_iterator)
        positions = torch.arange(seq, device=ids.device).expand_as(ids)
        logits = stage(ids, positions, None)  # last stage: (b, T, V_padded / tp); others: hidden states

        def collect(output: torch.Tensor):
            result = vocab_parallel_logprobs(output[:, :-1], ids[:, 1:], vocab_size=vocab_size,
                                             temperature=temperature, tp_group=tp_group, with_entropy=with_entropy)
            return output.new_zeros(()), {"logprobs": result.logprobs, "entropy": result.entropy}

        return logits, collect

    pp_group = pipeline_parallel_group()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=micro_batches,
        model=[model],
        num_microbatches=batch // micro_batch_size,
        seq_length=seq,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    pp_size, is_last = pp_group.size(), pp_group.rank() == pp_group.size() - 1
    shape = (batch, seq - 1)
    if is_last:
        logprobs = torch.cat([out["logprobs"] for out in outputs])
        entropy = torch.cat([out["entropy"] for out in outputs]) if with_entropy else None
    else:
        logprobs = torch.empty(shape, dtype=torch.float32, device=device)
        entropy = torch.empty(shape, dtype=torch.float32, device=device) if with_entropy else None
    if pp_size > 1:
        last = dist.get_global_rank(pp_group, pp_size - 1)
        dist.broadcast(logprobs, src=last, group=pp_group)
        if entropy is not None:
            dist.broadcast(entropy, src=last, group=pp_group)
    return LogprobsAndEntropy((logprobs, entropy))
