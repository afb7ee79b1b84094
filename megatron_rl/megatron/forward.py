"""Teacher-forced per-token logprobs through Megatron's pipeline schedule (forward only), and what the
train step shares with it: a stage forward whose last stage stops at the final hidden states (the
output layer then runs only where logprobs are needed, see :func:`output_layer_logprobs`), the output
weight, and token-budget micro-batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_rl.megatron.logprobs import DEFAULT_LOGPROB_CHUNK_SIZE, LogprobsAndEntropy, output_layer_logprobs
from megatron_rl.megatron.optim import unwrap_ddp
from megatron_rl.megatron.parallel import pipeline_parallel_group, tensor_parallel_group

__all__ = [
    "forward_groups",
    "forward_logprobs",
    "output_weight",
    "run_schedule",
    "schedule_shapes",
    "sequence_lengths",
    "split_rows",
    "stage_forward",
    "token_budget_micro_batches",
]


def stage_forward(stage: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """One micro-batch ``input_ids`` (b, T) through this rank's stage (a GPTModel, DDP-wrapped or not).

    Every stage returns its hidden states, (T, b, h): the last one its FINAL hidden states (after the
    final norm) instead of the logits. GPTModel returns them when ``post_process`` is off, the path every
    other pipeline stage takes; the flag is off for this call only (the decoder's final norm is built
    once and does not read it). Apply the output layer with :func:`output_layer_logprobs` and
    :func:`output_weight`.
    """
    gpt = unwrap_ddp(stage)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if not gpt.post_process:
        return stage(input_ids, positions, None)
    if gpt.config.sequence_parallel:
        raise ValueError("sequence_parallel=True is not supported: the final hidden states would be split over "
                         "the sequence")
    gpt.post_process = False
    try:
        return stage(input_ids, positions, None)
    finally:
        gpt.post_process = True


def output_weight(stage: torch.nn.Module) -> torch.Tensor:
    """The last stage's output-layer weight, (V_padded / tp, h): the word embedding when they are tied
    (the weight GPTModel's own output layer would be given), else ``output_layer.weight``. Gradients
    through it reach that parameter, so Megatron's DDP hooks and the tied-embedding all-reduce at PP > 1
    see them as before."""
    gpt = unwrap_ddp(stage)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def sequence_lengths(mask: torch.Tensor) -> list[int]:
    """Tokens each row of a right-padded batch needs, from its (N, T-1) target mask: through its last
    masked target (position t scores token t + 1, so t + 2 tokens); 2 for a row with none."""
    if mask.shape[1] == 0:
        return [1] * mask.shape[0]
    last = torch.where(mask.bool().cpu(), torch.arange(1, mask.shape[1] + 1), 0).amax(dim=1)  # t + 1; 0: none
    return [int(value) + 1 if value > 0 else 2 for value in last]


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Rows grouped into micro-batches of at most ``max_tokens`` PADDED tokens each.

    A micro-batch is padded to its own longest row, so it costs ``rows x longest`` tokens. The rows are
    sorted by length (longest first; ties by index) and cut greedily: a micro-batch takes the next row
    while ``(rows + 1) x longest <= max_tokens``. A row longer than the budget is a micro-batch alone.
    Deterministic: the result depends on ``lengths`` only. Example: lengths [5, 9, 3, 8], budget 16 ->
    [[1], [3, 0], [2]] (9 alone: 2 x 9 > 16; then 8 and 5 cost 2 x 8 = 16; 3 would make it 3 x 8), 28
    padded tokens where fixed pairs [0, 1], [2, 3] cost 2 x 9 + 2 x 8 = 34.

    Raises:
        ValueError: ``max_tokens < 1``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    groups: list[list[int]] = []
    for row in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups



def forward_groups(
    mask: torch.Tensor | None, batch: int, seq: int, *, micro_batch_size: int | None, max_tokens_per_micro_batch: int
) -> list[tuple[list[int], int]]:
    """The micro-batches of a forward over a (``batch``, ``seq``) batch, as (rows, width) pairs:
    token-budget groups (:func:`token_budget_micro_batches`) each cut to its longest row (lengths from
    the (B, T-1) ``mask``; None: every row full) when ``max_tokens_per_micro_batch`` > 0, else
    ``micro_batch_size`` consecutive rows (default all) at the full width."""
    if max_tokens_per_micro_batch > 0:
        lengths = sequence_lengths(mask) if mask is not None else [seq] * batch
        return [(rows, max(lengths[r] for r in rows))
                for rows in token_budget_micro_batches(lengths, max_tokens_per_micro_batch)]
    micro_batch_size = micro_batch_size or batch
    if batch % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} does not divide the batch size {batch}")
    return [(list(range(start, start + micro_batch_size)), seq) for start in range(0, batch, micro_batch_size)]


def split_rows(
    rows: torch.Tensor, mask: torch.Tensor, *, micro_batch_size: int, max_tokens_per_micro_batch: int, field: str
) -> tuple[list[torch.Tensor], list[int]]:
    """The rows ``rows`` of a mini-batch in micro-batches, with each one's width: token-budget groups
    (lengths from the rows of the (N, T-1) ``mask``) cut to their longest row, or (budget 0)
    ``micro_batch_size`` rows each at the full width T. ``field`` names the micro-batch size setting
    in the error when it does not divide the rows."""
    if max_tokens_per_micro_batch > 0:
        lengths = sequence_lengths(mask[rows])
        packed = token_budget_micro_batches(lengths, max_tokens_per_micro_batch)  # positions in ``rows``
        return [rows[group] for group in packed], [max(lengths[i] for i in group) for group in packed]
    if len(rows) % micro_batch_size:
        raise ValueError(f"{field}={micro_batch_size} does not divide the {len(rows)} sequences of a mini-batch; "
                         "pick a divisor of (prompts per mini-batch) x rollout.n")
    groups = list(rows.split(micro_batch_size))
    return groups, [mask.shape[1] + 1] * len(groups)


def run_schedule(model: torch.nn.Module, forward_step, micro_batches: Sequence, shapes: set[tuple[int, int]], *,
                 forward_only: bool) -> list:
    """Megatron's pipeline schedule of ``forward_step`` over ``micro_batches``, whose input ids have the
    (b, T) ``shapes`` (several: :func:`schedule_shapes`); returns what the last stage's loss functions
    reported, one per micro-batch (an empty list on the other stages)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with schedule_shapes(model, shapes):
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=max(seq for _, seq in shapes),
            micro_batch_size=max(rows for rows, _ in shapes),
            forward_only=forward_only,
        )


@contextlib.contextmanager
def schedule_shapes(model: torch.nn.Module, shapes: set[tuple[int, int]]) -> Iterator[None]:
    """Run Megatron's schedule over micro-batches of the given (b, T) ``shapes``.

    With one shape nothing changes. With several, the model config's ``variable_seq_lengths`` is on
    while the schedule runs: at PP > 1 each stage then sends an activation's shape before the activation
    (megatron-core's p2p communication), instead of assuming one shape for all micro-batches. (The
    schedule reads its options from the model config; Megatron-LM's own training loop sets several of
    them there the same way.) At PP = 1 the flag is not read.
    """
    config = unwrap_ddp(model).config
    if len(shapes) <= 1 or config.variable_seq_lengths:
        yield
        return
    config.variable_seq_lengths = True
    try:
        yield
    finally:
        config.variable_seq_lengths = False


@torch.no_grad()
def forward_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
    max_tokens_per_micro_batch: int = 0,
    mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
    with_entropy: bool = False,
) -> LogprobsAndEntropy:
    """Logprobs (and optionally entropy) of ``input_ids[:, 1:]`` given their prefixes, on every rank.

    Runs Megatron's ``forward_backward_func`` with ``forward_only=True`` (no pipelining at PP=1, 1F1B at
    PP>1); the last pipeline stage applies the output layer at the positions of ``mask`` only,
    ``chunk_size`` tokens at a time (:func:`output_layer_logprobs`), and broadcasts the result to the
    other stages. Every rank of a model replica must call this with the same arguments.

    Args:
        model: this rank's GPTModel stage (see :func:`megatron_rl.megatron.model.build_gpt_model`).
        input_ids: (B, T) token ids, right-padded, causal attention, positions 0..T-1.
        vocab_size: the HF vocabulary size (padded logits are ignored).
        micro_batch_size: rows per micro-batch (each (micro_batch_size, T)); must divide B. Default: B.
            Not used when ``max_tokens_per_micro_batch`` is set.
        max_tokens_per_micro_batch: > 0: micro-batches of rows grouped by length, each cut to its longest
            row and holding at most this many padded tokens (:func:`token_budget_micro_batches`, lengths
            from ``mask``); 0: fixed ``micro_batch_size`` rows.
        mask: (B, T-1) bool, the positions whose logprobs are wanted (e.g. the response tokens); None: all.
        chunk_size: tokens per chunk of the output layer and softmax (0: all of a micro-batch at once).

    Returns:
        ``(logprobs, entropy)``, each (B, T-1) fp32 in the rows' original order, 0 outside ``mask``;
        entropy None unless ``with_entropy``.
    """
    batch, seq = input_ids.shape
    if mask is not None and tuple(mask.shape) != (batch, seq - 1):
        raise ValueError(f"mask shape {tuple(mask.shape)} != (B, T-1) = {(batch, seq - 1)}")
    groups = forward_groups(mask, batch, seq, micro_batch_size=micro_batch_size,
                            max_tokens_per_micro_batch=max_tokens_per_micro_batch)
    device = torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")
    input_ids = input_ids.to(device)
    mask = None if mask is None else mask.to(device, torch.bool)
    index = [torch.tensor(rows, device=device) for rows, _width in groups]
    micro_batches = [(input_ids[rows, :width], None if mask is None else mask[rows, :width - 1])
                     for rows, (_, width) in zip(index, groups)]
    tp_group = tensor_parallel_group()

    def forward_step(data_iterator, stage):
        ids, target_mask = next(data_iterator)
        hidden = stage_forward(stage, ids)  # (T, b, h) on every stage; the last one's are final

        def collect(final_hidden: torch.Tensor):
            result = output_layer_logprobs(final_hidden, output_weight(stage), ids, vocab_size=vocab_size,
                                           temperature=temperature, tp_group=tp_group, with_entropy=with_entropy,
                                           mask=target_mask, chunk_size=chunk_size)
            return final_hidden.new_zeros(()), {"logprobs": result.logprobs, "entropy": result.entropy}

        return hidden, collect

    pp_group = pipeline_parallel_group()
    outputs = run_schedule(model, forward_step, micro_batches, {tuple(ids.shape) for ids, _ in micro_batches},
                           forward_only=True)
    pp_size, is_last = pp_group.size(), pp_group.rank() == pp_group.size() - 1
    shape = (batch, seq - 1)
    logprobs = torch.zeros(shape, dtype=torch.float32, device=device)
    entropy = torch.zeros(shape, dtype=torch.float32, device=device) if with_entropy else None
    if is_last:
        for rows, (_, width), out in zip(index, groups, outputs, strict=True):
            logprobs[rows, : width - 1] = out["logprobs"]
            if entropy is not None:
                entropy[rows, : width - 1] = out["entropy"]
    if pp_size > 1:
        last = dist.get_global_rank(pp_group, pp_size - 1)
        dist.broadcast(logprobs, src=last, group=pp_group)
        if entropy is not None:
            dist.broadcast(entropy, src=last, group=pp_group)
    return LogprobsAndEntropy((logprobs, entropy))
