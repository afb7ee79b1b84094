"""Policy losses, per token: PPO clip (clip-higher, dual clip), GSPO, CISPO, GMPO, Clip-Cov, KL-Cov and
plain REINFORCE.

Every loss has one calling convention (that of ``ppo_clip_loss``):

    loss, metrics = LOSS(logprobs, old_logprobs, advantages, mask, *, <its parameters>, global_num_tokens=None)

    logprobs      (B, T)  the policy being trained (carries grad)
    old_logprobs  (B, T)  the policy that sampled (detached)
    advantages    (B, T)  per token (``broadcast_to_tokens`` for outcome advantages)
    mask          (B, T)  bool or 0/1, the valid tokens
    -> loss (B, T), 0 at invalid tokens whatever the inputs hold there;
       metrics: a dict of 0-dim detached tensors with exactly the keys ``POLICY_LOSS_METRICS``.

Aggregation over tokens and sequences is separate (``aggregate``). The token-level losses (ppo_clip,
cispo, clip_cov, kl_cov, reinforce) work with any aggregation mode. GSPO and GMPO are sequence-level:
they put a term whose value is the sequence's loss on each of its valid tokens, so that
``aggregate(loss, mask, 'seq-mean-token-mean')`` is the paper's mean over sequences (value and
gradient); ``SEQUENCE_LEVEL_AGGREGATION`` names that mode, and the caller should use it for them (verl
forces it for GSPO) -- another mode weighs each sequence by its length.

Parameters. Each loss's own parameters are keyword arguments; their defaults and checks live in one
frozen dataclass per loss (``POLICY_LOSS_PARAMS[name]``, e.g. ``GSPOParams``), whose fields have the
keyword arguments' names. A caller that selects the loss by name (a config's ``policy_loss``) holds
one such dataclass per loss and calls

    loss, metrics = policy_loss(name, logprobs, old_logprobs, advantages, mask, params=params,
                                global_num_tokens=n, generator=g)

which is ``POLICY_LOSSES[name](..., **fields of params, global_num_tokens=n)`` (plus ``generator``
for clip_cov, the one loss that draws random numbers).

Metrics, each ``sum over valid tokens / global_num_tokens`` (default: this call's valid token count;
an empty batch gives 0), so summing them over micro-batches and DP ranks with the global count
gives the global mean; a metric a loss has no use for is 0:

- ``clip_frac_low``: the lower bound of the ratio clip is active (which tokens that is, per loss)
- ``clip_frac_high``: the upper bound is active
- ``clip_frac_dual``: PPO's dual clip is active
- ``cov_frac``: Clip-Cov / KL-Cov selected the token by its covariance
- ``ppo_kl``: mean of old_logprobs - logprobs, the k1 estimate of KL(old || new) (verl's)
- ``approx_kl``: mean of ratio - 1 - log(ratio), the k3 estimate of the same KL (>= 0)

Where a loss exponentiates a token log-ratio, ``logprobs - old_logprobs`` is first clamped to
[-20, 20] (as verl's PPO and CISPO; verl's Clip-Cov, KL-Cov and GMPO do not clamp): identical
values wherever |log-ratio| <= 20, a large finite ratio instead of inf beyond.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rl.validation import check_range

LOG_RATIO_LIMIT = 20.0
"""``logprobs - old_logprobs`` is clamped to [-20, 20] before ``exp`` (as verl), so a far
off-policy token gives a large finite ratio instead of inf."""

GSPO_LOG_RATIO_LIMIT = 10.0
"""GSPO's per-token log sequence ratio is clamped from above at 10 before ``exp`` (as verl)."""

POLICY_LOSS_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "cov_frac", "ppo_kl", "approx_kl")
"""The metric keys every policy loss returns (module docstring)."""

Normaliser = Tensor | float | None


# --- parameters: one frozen dataclass per loss, the home of its defaults and checks ------------


@dataclass(frozen=True)
class PPOClipParams:
    """Parameters of ``ppo_clip_loss``."""

    clip_low: float = 0.2
    """Lower clip: the ratio is clipped at ``1 - clip_low`` (in [0, 1))."""

    clip_high: float = 0.28
    """Upper clip: the ratio is clipped at ``1 + clip_high`` (>= 0); above clip_low is DAPO's clip-higher."""

    clip_c: float | None = 3.0
    """Dual-clip constant (> 1): the loss of a token with A < 0 is at most ``-A * clip_c``; None: off."""

    def __post_init__(self) -> None:
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(
                f"clip_low and clip_high must be >= 0; got clip_low={self.clip_low}, clip_high={self.clip_high}"
            )
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1 so that 1 - clip_low > 0; got {self.clip_low}")
        if self.clip_c is not None and self.clip_c <= 1:
            raise ValueError(f"clip_c must be > 1 (or None to turn the dual clip off); got {self.clip_c}")


@dataclass(frozen=True)
class GSPOParams:
    """Parameters of ``gspo_loss``; defaults: the GSPO paper's (Sec. 5.1), also verl's GSPO recipe."""

    clip_low: float = 3e-4
    """The sequence ratio is clipped at ``1 - clip_low`` (in [0, 1))."""

    clip_high: float = 4e-4
    """The sequence ratio is clipped at ``1 + clip_high`` (>= 0)."""

    def __post_init__(self) -> None:
        check_range("gspo.clip_low", self.clip_low, low=0.0)
        if self.clip_low >= 1:
            raise ValueError(f"gspo.clip_low={self.clip_low!r} must be < 1 so that 1 - clip_low > 0")
        check_range("gspo.clip_high", self.clip_high, low=0.0)


@dataclass(frozen=True)
class CISPOParams:
    """Parameters of ``cispo_loss``; defaults: MiniMax-M1's choice of no lower bound, and verl's
    CISPO example's upper bound."""

    clip_low: float | None = None
    """The IS weight is clipped from below at ``1 - clip_low`` (>= 0; 1 or more, or None: no lower
    bound, as MiniMax-M1, which tunes only the upper one)."""

    clip_high: float = 0.2
    """The IS weight is clipped from above at ``1 + clip_high`` (>= 0)."""

    def __post_init__(self) -> None:
        if self.clip_low is not None:
            check_range("cispo.clip_low", self.clip_low, low=0.0)
        check_range("cispo.clip_high", self.clip_high, low=0.0)


@dataclass(frozen=True)
class GMPOParams:
    """Parameters of ``gmpo_loss``: clip bounds on the token *log*-ratio; defaults: the GMPO paper's
    clip range (e^-0.4, e^0.4), also verl's GMPO example."""

    clip_low: float = 0.4
    """A token with A < 0 has its log-ratio clipped from below at ``-clip_low`` (> 0)."""

    clip_high: float = 0.4
    """A token with A > 0 has its log-ratio clipped from above at ``clip_high`` (> 0)."""

    def __post_init__(self) -> None:
        check_range("gmpo.clip_low", self.clip_low, low=0.0, low_inclusive=False)
        check_range("gmpo.clip_high", self.clip_high, low=0.0, low_inclusive=False)


@dataclass(frozen=True)
class ClipCovParams:
    """Parameters of ``clip_cov_loss``; defaults: verl's (``clip_ratio`` 0.2, ``policy_loss.clip_cov_*``)."""

    clip_low: float = 0.2
    """PPO's lower clip, ``1 - clip_low`` (in [0, 1))."""

    clip_high: float = 0.2
    """PPO's upper clip, ``1 + clip_high`` (>= 0)."""

    clip_cov_ratio: float = 2e-4
    """Fraction of this call's valid tokens whose gradient is cut (in (0, 1]; at least one token)."""

    clip_cov_lb: float = 1.0
    """Only tokens with covariance strictly above this are candidates."""

    clip_cov_ub: float = 5.0
    """... and strictly below this (> clip_cov_lb)."""

    def __post_init__(self) -> None:
        check_range("clip_cov.clip_low", self.clip_low, low=0.0)
        if self.clip_low >= 1:
            raise ValueError(f"clip_cov.clip_low={self.clip_low!r} must be < 1 so that 1 - clip_low > 0")
        check_range("clip_cov.clip_high", self.clip_high, low=0.0)
        check_range("clip_cov.clip_cov_ratio", self.clip_cov_ratio, low=0.0, low_inclusive=False, high=1.0)
        check_range("clip_cov.clip_cov_lb", self.clip_cov_lb)
        check_range("clip_cov.clip_cov_ub", self.clip_cov_ub, low=self.clip_cov_lb, low_inclusive=False)


@dataclass(frozen=True)
class KLCovParams:
    """Parameters of ``kl_cov_loss``; defaults: verl's (``policy_loss.kl_cov_ratio``, ``ppo_kl_coef``)."""

    kl_cov_ratio: float = 2e-4
    """Fraction of this call's valid tokens (the largest covariances) that get the KL term (in (0, 1];
    at least one token)."""

    ppo_kl_coef: float = 0.1
    """Weight of ``|log ratio|`` on the selected tokens (>= 0)."""

    def __post_init__(self) -> None:
        check_range("kl_cov.kl_cov_ratio", self.kl_cov_ratio, low=0.0, low_inclusive=False, high=1.0)
        check_range("kl_cov.ppo_kl_coef", self.ppo_kl_coef, low=0.0)


@dataclass(frozen=True)
class ReinforceParams:
    """``reinforce_loss`` has no parameters of its own."""


# --- shared pieces ---------------------------------------------------------------------------


def _check_shapes(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape) or logprobs.dim() != 2:
        raise ValueError(
            "logprobs, old_logprobs, advantages and mask must have one shape (B, T); got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(advantages.shape)}, {tuple(mask.shape)}"
        )


def _clamped_log_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    return (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _token_count(valid: Tensor, like: Tensor, global_num_tokens: Normaliser) -> Tensor:
    """The metrics' denominator as a 0-dim tensor; 0 becomes 1 so an empty batch gives 0."""
    if global_num_tokens is None:
        count = valid.sum().to(like.dtype)
    else:
        count = torch.as_tensor(global_num_tokens, dtype=like.dtype, device=like.device)
    return torch.where(count > 0, count, torch.ones_like(count))


def _metrics(valid: Tensor, log_ratio: Tensor, global_num_tokens: Normaliser, **flags: Tensor) -> dict[str, Tensor]:
    """All of ``POLICY_LOSS_METRICS``: the fractions of valid tokens whose ``flags`` are set (those not
    given are 0) and the two KL estimates from the (clamped) log-ratio."""
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        denominator = _token_count(valid, log_ratio, global_num_tokens)

        def mean(values: Tensor) -> Tensor:
            return torch.where(valid, values, torch.zeros_like(values)).sum() / denominator

        metrics = {name: log_ratio.new_zeros(()) for name in POLICY_LOSS_METRICS}
        for name, flag in flags.items():
            metrics[name] = (flag & valid).to(log_ratio.dtype).sum() / denominator
        metrics["ppo_kl"] = mean(-log_ratio)
        metrics["approx_kl"] = mean(log_ratio.exp() - 1 - log_ratio)
    return metrics


def _masked(loss: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, loss, torch.zeros_like(loss))


def _masked_mean_per_row(values: Tensor, valid: Tensor) -> Tensor:
    """(B, T) -> (B,): the mean over each row's valid entries (0 for a row with none)."""
    count = valid.sum(dim=-1).to(values.dtype).clamp_min(1)
    return _masked(values, valid).sum(dim=-1) / count


def _token_covariance(advantages: Tensor, logprobs: Tensor, valid: Tensor) -> Tensor:
    """``(A - mean A) * (logp - mean logp)`` per token, the means over the valid tokens (detached)."""
    count = valid.sum().to(logprobs.dtype).clamp_min(1)
    logp = logprobs.detach()
    advantage_mean = _masked(advantages, valid).sum() / count
    logp_mean = _masked(logp, valid).sum() / count
    return (advantages - advantage_mean) * (logp - logp_mean)


def _first_k(keys: Tensor, k: Tensor) -> Tensor:
    """Whether each entry is among the ``k`` (a 0-dim tensor) smallest ``keys`` (ties: first in
    row-major order), without reading k into Python."""
    flat = keys.flatten()
    order = torch.argsort(flat, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))
    return (rank < k).reshape(keys.shape)


def _num_selected(valid: Tensor, ratio: float) -> Tensor:
    """``max(floor(ratio * valid tokens), 1)`` as a 0-dim int64 tensor (verl's count, no ``.item()``)."""
    return (valid.sum().to(torch.float64) * ratio).floor().clamp_min(1).to(torch.int64)


# --- the losses ------------------------------------------------------------------------------


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = PPOClipParams.clip_low,
    clip_high: float = PPOClipParams.clip_high,
    clip_c: float | None = PPOClipParams.clip_c,
    global_num_tokens: Normaliser = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO loss with asymmetric clipping and dual clip.

    logprobs (B, T) the policy being trained (carries grad), old_logprobs (B, T) the policy that
    sampled (detached), advantages (B, T), mask (B, T) bool or 0/1
    -> (loss (B, T), metrics: dict of 0-dim detached tensors).

        ratio = exp(clamp(logprobs - old_logprobs, -20, 20))
        loss  = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        loss  = min(loss, -A * clip_c)    only where A < 0 (dual clip; clip_c=None turns it off)

    ``clip_high > clip_low`` is DAPO's clip-higher: a token with A > 0 may raise its
    probability further before its gradient stops. The dual clip bounds the loss of a token with
    A < 0 whose ratio has grown past ``clip_c``. Clipped tokens get zero gradient. The loss is 0
    at invalid tokens (whatever the inputs hold there). Parameters: ``PPOClipParams``.

    Metrics (``POLICY_LOSS_METRICS``, each ``sum over valid tokens / global_num_tokens``):

    - ``clip_frac_low``:  A < 0 and ratio < 1 - clip_low (the lower bound is active)
    - ``clip_frac_high``: A > 0 and ratio > 1 + clip_high (the upper bound is active)
    - ``clip_frac_dual``: A < 0 and ratio > clip_c (the dual clip is active)
    - ``ppo_kl``, ``approx_kl``: k1 and k3 estimates of KL(old || new); ``cov_frac`` is 0
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    PPOClipParams(clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)
    valid = mask.bool()
    log_ratio = _clamped_log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    if clip_c is not None:
        loss = torch.where(negative, torch.minimum(loss, -advantages * clip_c), loss)
    ratio_d = ratio.detach()
    flags = {
        "clip_frac_low": negative & (ratio_d < 1 - clip_low),
        "clip_frac_high": (advantages > 0) & (ratio_d > 1 + clip_high),
    }
    if clip_c is not None:
        flags["clip_frac_dual"] = negative & (ratio_d > clip_c)
    return _masked(loss, valid), _metrics(valid, log_ratio, global_num_tokens, **flags)


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = GSPOParams.clip_low,
    clip_high: float = GSPOParams.clip_high,
    global_num_tokens: Normaliser = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): PPO's clip on a sequence-level importance ratio.

    Shapes and metrics as ``ppo_clip_loss``; aggregate with 'seq-mean-token-mean'
    (``SEQUENCE_LEVEL_AGGREGATION``). The paper's objective, for a group of G responses y_i:

        s_i(θ)  = (π_θ(y_i|x) / π_old(y_i|x)) ** (1/|y_i|)
                = exp( (1/|y_i|) Σ_t log(π_θ(y_i,t|x,y_i,<t) / π_old(y_i,t|x,y_i,<t)) )
        J(θ)    = E[ (1/G) Σ_i min( s_i(θ) A_i, clip(s_i(θ), 1 - clip_low, 1 + clip_high) A_i ) ]

    The geometric mean over the response's valid tokens makes s_i independent of the response's
    length: the same per-token log-ratio gives the same s_i whatever |y_i|. Computed in the
    paper's GSPO-token form (as verl), which equals GSPO when A_i,t = A_i and allows token-level
    advantages:

        s_i,t(θ) = sg[s_i(θ)] * π_θ(y_i,t|...) / sg[π_θ(y_i,t|...)]
                   (value s_i, gradient s_i ∇log π_θ(y_i,t))
        loss_i,t = max(-A_i,t s_i,t, -A_i,t clip(s_i,t, 1 - clip_low, 1 + clip_high))

    so 'seq-mean-token-mean' of loss_i,t is -J with the paper's gradient ``-A_i ∇s_i`` (unclipped).
    ``log s_i,t`` is clamped at 10 from above (as verl). Defaults (3e-4, 4e-4) are the paper's:
    sequence ratios stay much closer to 1 than token ratios.

    Metrics: ``clip_frac_low``: tokens of sequences with A < 0 and s_i < 1 - clip_low;
    ``clip_frac_high``: A > 0 and s_i > 1 + clip_high (their sum is verl's ``pg_clipfrac``);
    ``ppo_kl``, ``approx_kl`` per token as ``ppo_clip_loss``.
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    GSPOParams(clip_low=clip_low, clip_high=clip_high)
    valid = mask.bool()
    seq_log_ratio = _masked_mean_per_row(logprobs - old_logprobs, valid).detach()  # (B,) log s_i
    log_ratio = logprobs - logprobs.detach() + seq_log_ratio.unsqueeze(-1)  # (B, T): value log s_i
    ratio = torch.exp(log_ratio.clamp(max=GSPO_LOG_RATIO_LIMIT))
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    ratio_d = ratio.detach()
    flags = {
        "clip_frac_low": (advantages < 0) & (ratio_d < 1 - clip_low),
        "clip_frac_high": (advantages > 0) & (ratio_d > 1 + clip_high),
    }
    return _masked(loss, valid), _metrics(valid, _clamped_log_ratio(logprobs, old_logprobs), global_num_tokens, **flags)


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | None = CISPOParams.clip_low,
    clip_high: float = CISPOParams.clip_high,
    global_num_tokens: Normaliser = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE weighted by a clipped, stop-gradient
    importance-sampling weight; no token is ever dropped from the gradient.

    Shapes and metrics as ``ppo_clip_loss``; any aggregation (the paper uses 'token-mean'). The
    paper's objective:

        r_i,t(θ)  = π_θ(o_i,t|q,o_i,<t) / π_old(o_i,t|q,o_i,<t)
        r̂_i,t(θ)  = clip(r_i,t(θ), 1 - clip_low, 1 + clip_high)
        J(θ)      = E[ 1/Σ_i|o_i| Σ_i Σ_t sg(r̂_i,t(θ)) Â_i,t log π_θ(o_i,t|q,o_i,<t) ]

    so ``loss = -sg(r̂) * A * logprobs`` (verl's ``compute_policy_loss_cispo``); the gradient
    flows through ``logprobs`` only, ``-r̂ A ∇log π``, also for tokens whose weight is clipped
    (where PPO would stop their gradient). The log-ratio is clamped to [-20, 20] before ``exp``
    (as verl). ``clip_low=None`` (the default, as the paper) puts no lower bound on the weight;
    verl's example gets the same by ``clip_ratio_low=10``.

    Metrics: ``clip_frac_low``: r < 1 - clip_low; ``clip_frac_high``: r > 1 + clip_high, whatever
    the advantage's sign (the weight is clipped either way; their sum is verl's ``pg_clipfrac``).
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    CISPOParams(clip_low=clip_low, clip_high=clip_high)
    valid = mask.bool()
    log_ratio = _clamped_log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_ratio).detach()
    lower = None if clip_low is None else 1 - clip_low
    weight = ratio.clamp(min=lower, max=1 + clip_high)
    loss = -weight * advantages * logprobs
    flags = {"clip_frac_high": ratio > 1 + clip_high}
    if lower is not None:
        flags["clip_frac_low"] = ratio < lower
    return _masked(loss, valid), _metrics(valid, log_ratio, global_num_tokens, **flags)


def gmpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = GMPOParams.clip_low,
    clip_high: float = GMPOParams.clip_high,
    global_num_tokens: Normaliser = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO (Zhao et al. 2025, arXiv 2507.20673): the geometric mean of the clipped token ratios
    of a response, instead of GRPO's arithmetic mean.

    Shapes and metrics as ``ppo_clip_loss``; aggregate with 'seq-mean-token-mean'
    (``SEQUENCE_LEVEL_AGGREGATION``). The paper's objective, for a group of G responses o_i:

        ρ_i,t(θ) = π_θ(o_i,t|q,o_i,<t) / π_old(o_i,t|q,o_i,<t)
        J(θ)     = E[ (1/G) Σ_i ( Π_t |min(ρ_i,t Â_i, clip(ρ_i,t, e^-clip_low, e^clip_high) Â_i)| )^(1/|o_i|)
                      * sgn(Â_i) ]

    computed in log space, as verl's ``compute_policy_loss_geo_mean``:

        l_i,t  = sgn(A_i,t) * min(sgn(A_i,t) log ρ_i,t, sgn(A_i,t) clamp(log ρ_i,t, -clip_low, clip_high))
        L_i    = -mean_t(A_i,t) * exp(mean_t l_i,t)        (means over the response's valid tokens)

    i.e. a token with A > 0 has its log-ratio capped at clip_high, one with A < 0 floored at
    -clip_low (its gradient then stops), and the sequence's advantage is the mean of its token
    advantages (equal to A_i for outcome advantages). The loss holds L_i at each valid token of
    response i, so 'seq-mean-token-mean' gives -J = (1/G) Σ_i L_i with its gradient.

    Differences from verl, all documented conventions: the log-ratio is clamped to [-20, 20]
    (verl leaves the clamp commented out); the means divide by the valid-token count (verl by
    count + 1e-8); verl averages L_i over all B rows of the micro-batch (``torch.mean``), counting
    rows without valid tokens, where 'seq-mean-token-mean' counts only rows with one (or the
    caller's ``global_num_seqs``). Metrics: ``clip_frac_high``: A > 0 and log ρ > clip_high;
    ``clip_frac_low``: A < 0 and log ρ < -clip_low, i.e. where the clip is active (verl's metrics
    count any token outside the range with A > 0, resp. A < 0).
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    GMPOParams(clip_low=clip_low, clip_high=clip_high)
    valid = mask.bool()
    log_ratio = _clamped_log_ratio(logprobs, old_logprobs)
    sign = torch.sign(advantages)
    chosen = sign * torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-clip_low, clip_high))
    seq_ratio = torch.exp(_masked_mean_per_row(chosen, valid))  # (B,)
    seq_advantage = _masked_mean_per_row(advantages, valid)  # (B,)
    seq_loss = -seq_advantage * seq_ratio  # (B,)
    loss = seq_loss.unsqueeze(-1).expand(logprobs.shape)
    log_ratio_d = log_ratio.detach()
    flags = {
        "clip_frac_low": (advantages < 0) & (log_ratio_d < -clip_low),
        "clip_frac_high": (advantages > 0) & (log_ratio_d > clip_high),
    }
    return _masked(loss, valid), _metrics(valid, log_ratio, global_num_tokens, **flags)


def clip_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = ClipCovParams.clip_low,
    clip_high: float = ClipCovParams.clip_high,
    clip_cov_ratio: float = ClipCovParams.clip_cov_ratio,
    clip_cov_lb: float = ClipCovParams.clip_cov_lb,
    clip_cov_ub: float = ClipCovParams.clip_cov_ub,
    global_num_tokens: Normaliser = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv
    2505.22617): PPO's clipped loss, with the gradient cut at a few random tokens of high
    covariance between log-probability and advantage (the tokens that drive entropy down).

    Shapes and metrics as ``ppo_clip_loss``; any aggregation. With N the valid tokens of this call
    (as verl: one micro-batch) and means over them:

        Cov_t   = (log π_θ(y_t) - mean log π_θ) * (A_t - mean A)
        I_clip  = a uniformly random subset, of size min(max(floor(clip_cov_ratio * N), 1), |C|), of
                  C = { t : clip_cov_lb < Cov_t < clip_cov_ub, and PPO's clip not active at t }
        loss_t  = 0 for t in I_clip (no gradient), else max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))

    as verl's ``compute_policy_loss_clip_cov`` (no dual clip). ``generator`` draws the subset (on
    the tensors' device; None: torch's default generator, as verl's ``randperm``); a seeded one
    makes the choice reproducible. verl draws the subset with ``randperm``; here each candidate
    gets a uniform key and the smallest keys win -- the same distribution, without reading the
    count into Python. The covariance means divide by N (verl: N + 1e-8).

    Metrics: ``cov_frac``: the selected tokens (verl reports this as ``pg_clipfrac``);
    ``clip_frac_low`` / ``clip_frac_high`` as ``ppo_clip_loss``.
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    ClipCovParams(clip_low=clip_low, clip_high=clip_high, clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
                  clip_cov_ub=clip_cov_ub)
    valid = mask.bool()
    log_ratio = _clamped_log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    with torch.no_grad():
        clipped_by_ppo = clipped > unclipped
        covariance = _token_covariance(advantages, logprobs, valid)
        candidates = valid & ~clipped_by_ppo & (covariance > clip_cov_lb) & (covariance < clip_cov_ub)
        keys = torch.rand(advantages.shape, generator=generator, device=advantages.device, dtype=torch.float64)
        keys = torch.where(candidates, keys, torch.full_like(keys, 2.0))  # non-candidates sort last
        selected = candidates & _first_k(keys, _num_selected(valid, clip_cov_ratio))
    loss = torch.where(selected, torch.zeros_like(unclipped), torch.maximum(unclipped, clipped))
    ratio_d = ratio.detach()
    flags = {
        "clip_frac_low": (advantages < 0) & (ratio_d < 1 - clip_low),
        "clip_frac_high": (advantages > 0) & (ratio_d > 1 + clip_high),
        "cov_frac": selected,
    }
    return _masked(loss, valid), _metrics(valid, log_ratio, global_num_tokens, **flags)


def kl_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    kl_cov_ratio: float = KLCovParams.kl_cov_ratio,
    ppo_kl_coef: float = KLCovParams.ppo_kl_coef,
    global_num_tokens: Normaliser = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617): the unclipped policy-gradient surrogate, with a KL
    penalty on the tokens of largest covariance between log-probability and advantage.

    Shapes and metrics as ``ppo_clip_loss``; any aggregation. With N the valid tokens of this call
    (as verl: one micro-batch) and means over them:

        Cov_t  = (log π_θ(y_t) - mean log π_θ) * (A_t - mean A)
        I_KL   = the max(floor(kl_cov_ratio * N), 1) valid tokens of largest Cov_t
        loss_t = -A_t r_t + ppo_kl_coef * |log r_t|   for t in I_KL
        loss_t = -A_t r_t                            otherwise (no clipping at all)

    as verl's ``compute_policy_loss_kl_cov``. Ties in Cov_t go to the earlier token (row-major;
    ``torch.topk`` leaves them unspecified).

    Metrics: ``cov_frac``: the selected tokens; ``ppo_kl``, ``approx_kl`` as ``ppo_clip_loss``
    (verl reports the mean of |log r| as ``ppo_kl`` here); no clip fractions.
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    KLCovParams(kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=ppo_kl_coef)
    valid = mask.bool()
    log_ratio = _clamped_log_ratio(logprobs, old_logprobs)
    surrogate = -advantages * torch.exp(log_ratio)
    with torch.no_grad():
        covariance = _token_covariance(advantages, logprobs, valid)
        keys = torch.where(valid, -covariance, torch.full_like(covariance, torch.inf))  # largest first
        selected = valid & _first_k(keys, _num_selected(valid, kl_cov_ratio))
    loss = torch.where(selected, surrogate + ppo_kl_coef * log_ratio.abs(), surrogate)
    return _masked(loss, valid), _metrics(valid, log_ratio, global_num_tokens, cov_frac=selected)


def reinforce_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    global_num_tokens: Normaliser = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain REINFORCE (Williams 1992): ``loss = -A * logprobs``, no ratio and no clipping.

    Shapes and metrics as ``ppo_clip_loss``; any aggregation. ``J(θ) = E[ Σ_t A_t log π_θ(y_t) ]``,
    gradient ``-A ∇log π``: the on-policy policy gradient, exact only for the update right after
    sampling (later mini-batches or epochs are off-policy and uncorrected). As verl's ``gpg`` loss
    and ``compute_policy_loss_reinforce`` without IS weights. ``old_logprobs`` feed only the
    ``ppo_kl`` / ``approx_kl`` metrics; the clip fractions and ``cov_frac`` are 0.
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask)
    valid = mask.bool()
    return _masked(-advantages * logprobs, valid), _metrics(valid, _clamped_log_ratio(logprobs, old_logprobs),
                                                             global_num_tokens)


# --- selection by name -----------------------------------------------------------------------

PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]

POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
    "gmpo": gmpo_loss,
    "clip_cov": clip_cov_loss,
    "kl_cov": kl_cov_loss,
    "reinforce": reinforce_loss,
}
"""Each policy loss by name; all share ``ppo_clip_loss``'s calling convention (module docstring)."""

POLICY_LOSS_PARAMS: dict[str, type] = {
    "ppo_clip": PPOClipParams,
    "gspo": GSPOParams,
    "cispo": CISPOParams,
    "gmpo": GMPOParams,
    "clip_cov": ClipCovParams,
    "kl_cov": KLCovParams,
    "reinforce": ReinforceParams,
}
"""The parameter dataclass of each loss: its fields are the loss's keyword arguments."""

SEQUENCE_LEVEL_AGGREGATION: dict[str, str] = {"gspo": "seq-mean-token-mean", "gmpo": "seq-mean-token-mean"}
"""The sequence-level losses and the ``aggregate`` mode their objective is defined with; the losses
not listed are token-level (any mode)."""


def policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    params: object | None = None,
    global_num_tokens: Normaliser = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss named ``name`` (one of ``POLICY_LOSSES``) with ``params`` (an instance of
    ``POLICY_LOSS_PARAMS[name]``; None: its defaults): (loss (B, T), metrics), as ``ppo_clip_loss``.

    ``generator`` is passed to the losses that draw random numbers (clip_cov) and ignored by the
    others. Raises ValueError naming an unknown ``name`` or a ``params`` of the wrong class.
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; allowed: {', '.join(POLICY_LOSSES)}")
    params_class = POLICY_LOSS_PARAMS[name]
    if params is None:
        params = params_class()
    if not isinstance(params, params_class):
        raise ValueError(f"policy loss {name!r} takes {params_class.__name__} parameters; got {type(params).__name__}")
    kwargs = {field.name: getattr(params, field.name) for field in dataclasses.fields(params)}
    if name == "clip_cov":
        kwargs["generator"] = generator
    return POLICY_LOSSES[name](logprobs, old_logprobs, advantages, mask, global_num_tokens=global_num_tokens, **kwargs)
