"""One policy update: Megatron's forward/backward schedule over micro-batches, then one optimizer step.

The loss of a micro-batch ``i`` on DP rank ``r`` is its share of the global token mean::

    loss_i = sum_{valid t} (pg_loss_t + kl_coef * kl_t) / N          N = valid tokens over ALL
                                                                        micro-batches and DP ranks

so ``sum_{i, r} loss_i`` is the token mean over the whole batch. Megatron divides what the loss
function returns by the number of micro-batches, and its DDP averages gradients over the DP group;
the loss function therefore returns ``loss_i * num_microbatches * dp_size`` so that the gradient is
exactly that of the global token mean. ``N`` comes from the caller (:func:`count_valid_tokens`).
That holds for any number of micro-batches per DP rank and any shape per micro-batch (token-budget
micro-batches): the factor is undone per rank, and ``N`` is global.

The last stage applies the output layer at the loss mask's positions only, ``logprob_chunk_size``
tokens at a time (:func:`megatron_rl.megatron.logprobs.output_layer_logprobs`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_rl import algorithms
from megatron_rl.megatron.forward import output_weight, run_schedule, stage_forward
from megatron_rl.megatron.logprobs import DEFAULT_LOGPROB_CHUNK_SIZE, output_layer_logprobs
from megatron_rl.megatron.parallel import data_parallel_group, pipeline_parallel_group, tensor_parallel_group

__all__ = ["LossSettings", "MicroBatch", "count_valid_sequences", "count_valid_tokens", "train_step"]

LOSS_KINDS = ("ppo", "nll")
_CLIP_METRICS = algorithms.POLICY_LOSS_METRICS  # clip fractions, cov_frac, ppo_kl, approx_kl


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of rollouts; every (b, T-1) tensor is aligned with the logprobs of
    ``input_ids[:, 1:]`` (position t holds the token at t + 1 given its prefix)."""

    input_ids: torch.Tensor  # (b, T) prompt + response token ids
    response_mask: torch.Tensor  # (b, T-1) bool: True where the target token is a response token
    old_logprobs: torch.Tensor | None  # (b, T-1) logprobs of the policy before the update; None: on-policy
    advantages: torch.Tensor  # (b, T-1) per-token advantages
    ref_logprobs: torch.Tensor | None = None  # (b, T-1) reference-model logprobs; None: no KL term
    rollout_logprobs: torch.Tensor | None = None  # (b, T-1) the engine's logprobs; given: the gap is reported

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        shaped = {"response_mask": self.response_mask, "advantages": self.advantages}
        for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
            if getattr(self, name) is not None:
                shaped[name] = getattr(self, name)
        for name, tensor in shaped.items():
            if tuple(tensor.shape) != (b, t - 1):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected (b, T-1) = {(b, t - 1)}")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The clipped policy-gradient loss with an optional KL penalty to the reference model."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float | None = 3.0
    """Dual-clip constant (None turns it off); see :func:`megatron_rl.algorithms.ppo_clip_loss`."""
    kl_coef: float = 0.001
    """Weight of the KL penalty (used only when micro-batches carry ``ref_logprobs``)."""
    kl_kind: str = "low_var_kl"
    temperature: float = 1.0
    """The rollout's sampling temperature: logprobs are those of ``softmax(logits / temperature)``."""
    entropy_coef: float = 0.0
    """Entropy bonus: ``entropy_coef * entropy`` (aggregated like the loss) is subtracted from the loss."""
    loss_agg: str = "token-mean"
    """How per-token losses become one number (:data:`megatron_rl.algorithms.AGGREGATION_MODES`)."""
    kind: str = "ppo"
    """'ppo': the clipped policy-gradient loss; 'nll': supervised negative log-likelihood of the
    response tokens (an SFT step; old_logprobs and advantages are ignored)."""
    loss_agg_constant: float | None = None
    """The fixed length of the 'seq-mean-token-sum-norm' aggregation (Dr.GRPO); None: the widest
    micro-batch's T-1 (with fixed micro-batches, the batch's padded length). Pass it when micro-batches are
    cut to their own lengths, so that the loss does not depend on how the rows were grouped."""
    logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE
    """Tokens per chunk of the output layer + logprobs/entropy (0: all of a micro-batch at once); a memory
    knob that does not change the maths."""
    policy_loss: str = "ppo_clip"
    """The policy loss of ``kind='ppo'`` (:data:`megatron_rl.algorithms.POLICY_LOSSES`)."""
    policy_loss_params: object | None = None
    """Its parameters (an instance of ``algorithms.POLICY_LOSS_PARAMS[policy_loss]``); None: for 'ppo_clip'
    ``PPOClipParams(clip_low, clip_high, clip_c)`` from the fields above, for the others their defaults."""
    loss_seed: int = 0
    """Seed of the generator of the losses that draw random numbers (clip_cov), made afresh by each
    train_step call: the caller passes one per update (e.g. from the run's seed and step), so a resumed
    run draws what the uninterrupted one drew."""

    def loss_params(self) -> object:
        """The policy loss's parameters (see ``policy_loss_params``)."""
        if self.policy_loss_params is not None:
            return self.policy_loss_params
        if self.policy_loss == "ppo_clip":
            return algorithms.PPOClipParams(clip_low=self.clip_low, clip_high=self.clip_high, clip_c=self.clip_c)
        return algorithms.POLICY_LOSS_PARAMS[self.policy_loss]()

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind={self.kind!r}; allowed: {', '.join(LOSS_KINDS)}")
        if self.loss_agg not in algorithms.AGGREGATION_MODES:
            raise ValueError(f"loss_agg={self.loss_agg!r}; allowed: {', '.join(algorithms.AGGREGATION_MODES)}")
        if self.entropy_coef < 0:
            raise ValueError(f"entropy_coef={self.entropy_coef!r} must be >= 0")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef={self.kl_coef!r} must be >= 0")
        if self.kl_kind not in algorithms.KL_KINDS:
            raise ValueError(f"kl_kind={self.kl_kind!r}; allowed: {', '.join(algorithms.KL_KINDS)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if self.loss_agg_constant is not None and not self.loss_agg_constant > 0:
            raise ValueError(f"loss_agg_constant={self.loss_agg_constant!r} must be > 0 (or None)")
        if not isinstance(self.logprob_chunk_size, int) or self.logprob_chunk_size < 0:
            raise ValueError(f"logprob_chunk_size={self.logprob_chunk_size!r} must be an integer >= 0")
        if self.policy_loss not in algorithms.POLICY_LOSSES:
            raise ValueError(f"policy_loss={self.policy_loss!r}; allowed: {', '.join(algorithms.POLICY_LOSSES)}")
        params_class = algorithms.POLICY_LOSS_PARAMS[self.policy_loss]
        if self.policy_loss_params is not None and not isinstance(self.policy_loss_params, params_class):
            raise ValueError(f"policy_loss_params={self.policy_loss_params!r} must be a {params_class.__name__} "
                             f"for policy_loss={self.policy_loss!r}")


def count_valid_tokens(micro_batches: Sequence[MicroBatch]) -> int:
    """Valid (response) tokens over these micro-batches and every data-parallel rank (all-reduce SUM).

    Every rank of the world must call this (it is collective over the DP group)."""
    return _data_parallel_sum(sum(int(mb.response_mask.sum()) for mb in micro_batches))


def count_valid_sequences(micro_batches: Sequence[MicroBatch]) -> int:
    """Sequences with at least one valid token over these micro-batches and every data-parallel rank
    (the normaliser of the seq-mean loss aggregations). Collective over the DP group."""
    return _data_parallel_sum(sum(int(mb.response_mask.any(dim=-1).sum()) for mb in micro_batches))


def _data_parallel_sum(local: int) -> int:
    count = torch.tensor([local], dtype=torch.int64)
    group = data_parallel_group()
    if group.size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return int(count.item())


def train_step(
    model: torch.nn.Module,
    optimizer,
    micro_batches: Sequence[MicroBatch],
    *,
    global_num_tokens: int,
    vocab_size: int,
    settings: LossSettings = LossSettings(),
    global_num_seqs: int | None = None,
) -> dict[str, float]:
    """Forward + backward over ``micro_batches`` (1F1B when PP > 1), then one clipped optimizer step.

    Args:
        model: this rank's stage wrapped by :func:`megatron_rl.megatron.optim.wrap_ddp`.
        optimizer: from :func:`megatron_rl.megatron.optim.build_optimizer`.
        micro_batches: this DP rank's micro-batches (their shapes (b, T) may differ, e.g. token-budget
            micro-batches; at PP > 1 the schedule then sends each activation's shape first); every TP/PP
            rank of a model replica passes the same ones. DP ranks may hold different numbers of them.
        global_num_tokens: valid tokens over all micro-batches and DP ranks (:func:`count_valid_tokens`);
            the token-mean denominator.
        global_num_seqs: valid sequences over all micro-batches and DP ranks
            (:func:`count_valid_sequences`); needed by the seq-mean ``settings.loss_agg`` modes.
        vocab_size: the HF vocabulary size (padded logits are ignored).

    Returns:
        Python floats, the same on every rank: ``loss`` (policy loss + kl_coef * kl - entropy_coef *
        entropy, aggregated by ``loss_agg``), ``pg_loss`` (the NLL for ``kind='nll'``), ``kl`` (token mean
        of the ``kl_kind`` estimate; 0 without a reference), ``entropy`` (token mean),
        ``rollout_logprob_gap`` (token mean of |trainer - engine logprob|; 0 without ``rollout_logprobs``),
        ``clip_frac_low``/``clip_frac_high``/``clip_frac_dual``, ``cov_frac``, ``ppo_kl``, ``approx_kl`` (the
        policy loss's metrics, global token means), ``grad_norm`` (before clipping) and ``update_successful``
        (1.0 or 0.0).
    """
    if not micro_batches:
        raise ValueError("micro_batches is empty")
    shapes = {tuple(mb.input_ids.shape) for mb in micro_batches}
    num_microbatches = len(micro_batches)
    agg_constant = settings.loss_agg_constant or max(seq for _, seq in shapes) - 1
    dp_group, tp_group, pp_group = data_parallel_group(), tensor_parallel_group(), pipeline_parallel_group()
    loss_multiplier = num_microbatches * dp_group.size()  # undone by the schedule and the DDP average
    device = torch.cuda.current_device() if torch.cuda.is_available() else torch.device("cpu")
    loss_params = settings.loss_params()
    # the same draws on every TP rank of a replica (their losses must agree); consumed micro-batch by micro-batch
    generator = torch.Generator(device=device).manual_seed(settings.loss_seed)

    def forward_step(data_iterator, stage):
        mb: MicroBatch = next(data_iterator)
        ids = mb.input_ids.to(device)
        mask = mb.response_mask.to(device)
        output = stage_forward(stage, ids)  # (T, b, h); the last stage's are the final hidden states

        def loss_func(hidden: torch.Tensor):
            # (b, T-1) each, computed at the loss mask's positions only (0 elsewhere: masked out below)
            logprobs, entropy = output_layer_logprobs(hidden, output_weight(stage), ids, vocab_size=vocab_size,
                                                      temperature=settings.temperature, tp_group=tp_group,
                                                      with_entropy=True, mask=mask,
                                                      chunk_size=settings.logprob_chunk_size)
            token_mean = functools.partial(algorithms.aggregate, mask=mask, mode="token-mean",
                                           global_num_tokens=global_num_tokens)
            aggregate = functools.partial(algorithms.aggregate, mask=mask, mode=settings.loss_agg,
                                          global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                                          constant=agg_constant)
            if settings.kind == "nll":
                pg = aggregate(-logprobs)
                metrics = {name: torch.zeros((), device=device) for name in _CLIP_METRICS}
            else:
                # On-policy (the first update after sampling): the old policy IS the current one, so its
                # logprobs are these, detached; no separate forward is needed.
                old = logprobs.detach() if mb.old_logprobs is None else mb.old_logprobs.to(device)
                pg_loss, metrics = algorithms.policy_loss(
                    settings.policy_loss, logprobs, old, mb.advantages.to(device), mask, params=loss_params,
                    global_num_tokens=global_num_tokens, generator=generator)
                pg = aggregate(pg_loss)
            loss = pg
            if mb.ref_logprobs is not None:
                kl_tokens = algorithms.kl_penalty(logprobs, mb.ref_logprobs.to(device), settings.kl_kind)
                kl = token_mean(kl_tokens)
                loss = loss + settings.kl_coef * (kl if settings.loss_agg == "token-mean" else aggregate(kl_tokens))
            else:
                kl = torch.zeros((), device=device)
            if settings.entropy_coef:
                loss = loss - settings.entropy_coef * aggregate(entropy)
            gap = (torch.zeros((), device=device) if mb.rollout_logprobs is None
                   else token_mean((logprobs.detach() - mb.rollout_logprobs.to(device)).abs()))
            reported = {"loss": loss.detach(), "pg_loss": pg.detach(), "kl": kl.detach(),
                        "entropy": token_mean(entropy.detach()), "rollout_logprob_gap": gap, **metrics}
            return loss * loss_multiplier, reported

        return output, loss_func

    names = ("loss", "pg_loss", "kl", "entropy", "rollout_logprob_gap", *_CLIP_METRICS)
    return schedule_and_step(forward_step, micro_batches, names, loss_name="loss", model=model, optimizer=optimizer,
                             pp_group=pp_group, dp_group=dp_group)


def schedule_and_step(forward_step, micro_batches: Sequence, names: Sequence[str], *, loss_name: str,
                      model: torch.nn.Module, optimizer, pp_group, dp_group) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (each with an ``input_ids`` of its own shape): gradients
    zeroed, Megatron's forward-backward schedule with ``forward_step``, the reported ``names`` summed
    over micro-batches (each value already divided by the global count) and data-parallel ranks and
    sent to every stage, then the optimizer step, skipped on every rank when the loss ``loss_name`` or
    any gradient is not finite. Adds ``grad_norm`` and ``update_successful``."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(model, forward_step, micro_batches, {tuple(mb.input_ids.shape) for mb in micro_batches},
                           forward_only=False)
    totals = torch.zeros(len(names), dtype=torch.float64)
    pp_size = pp_group.size()
    if pp_group.rank() == pp_size - 1:
        for reported in outputs:
            totals += torch.stack([reported[n].double().cpu() for n in names])
    if dp_group.size() > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=dp_group)
    if pp_size > 1:
        dist.broadcast(totals, src=dist.get_global_rank(pp_group, pp_size - 1), group=pp_group)
    result = dict(zip(names, totals.tolist(), strict=True))
    # Megatron's fp32 and bf16 optimizers (no loss scaler) step on whatever the gradients hold: a NaN
    # would reach every weight. A non-finite loss or gradient anywhere skips the step on every rank.
    if math.isfinite(result[loss_name]) and _gradients_finite(model):
        update_successful, grad_norm, _ = optimizer.step()
    else:  # the gradients are zeroed at the start of the next step
        update_successful, grad_norm = False, None
    result["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    result["update_successful"] = float(bool(update_successful))
    return result


def _gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every rank's gradients (the DDP main grads, already reduced over DP) are finite.
    Collective over the whole world (every rank runs train_step)."""
    grads = (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad for p in model.parameters())
    checks = [torch.isfinite(g).all() for g in grads if g is not None]
    finite = (torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool)).to("cpu", torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
