"""KL to the reference policy as a per-token reward penalty (PPO/RLHF style), with fixed and adaptive
coefficients -- the alternative to the KL *loss* term (``kl_penalty`` added to the policy loss).

    token_scores = outcome_token_rewards(rewards, mask)                  # (B, T): r on the last valid token
    token_rewards, kl = kl_penalised_rewards(token_scores, old_logprobs, ref_logprobs, mask,
                                             coef=controller.value, kind="k1")
    advantages, returns = gae(token_rewards, values, mask, gamma=1.0, lam=1.0)
    controller.update(float(kl), n_steps=num_sequences)                  # the caller reads the value

Pure: the controllers hold plain floats and never read tensors; the caller converts the KL it
passes in. ``state_dict`` / ``load_state_dict`` let a run checkpoint the adaptive coefficient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rl.algorithms.kl import kl_penalty
from megatron_rl.validation import check_choice, check_range

KL_CONTROLLERS = ("fixed", "adaptive")
"""The ``kind`` values ``make_kl_controller`` accepts."""

ADAPTIVE_KL_ERROR_LIMIT = 0.2
"""The adaptive controller's proportional error ``KL / target - 1`` is clipped to [-0.2, 0.2]."""


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """One reward per response placed on its last valid token: rewards (B,), mask (B, T) -> (B, T).

    As verl's reward managers (``reward_tensor[i, valid_response_length - 1] = score``), with "last
    valid token" read from the mask, so a mask with holes (tool output inside a response) still puts
    the reward on the response's final token. 0 elsewhere; a row without valid tokens gets none.
    """
    if rewards.dim() != 1 or mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"rewards must be (B,) and mask (B, T); got {tuple(rewards.shape)} and {tuple(mask.shape)}")
    valid = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=-1)  # (B,), -1: no valid token
    is_last = (positions == last.unsqueeze(-1)) & valid
    return torch.where(is_last, rewards.unsqueeze(-1).expand(mask.shape), torch.zeros((), dtype=rewards.dtype,
                                                                                       device=rewards.device))


def kl_penalised_rewards(
    token_scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    coef: float,
    kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """``r_t = score_t - coef * kl_t`` per token, and the batch's mean KL for the controller.

    token_scores (B, T) (e.g. ``outcome_token_rewards``), logprobs (B, T) of the policy that sampled
    (the old policy, detached), ref_logprobs (B, T) of the reference, mask (B, T) bool or 0/1
    -> (token_rewards (B, T), mean_kl 0-dim).

        kl_t          = kl_penalty(logprobs, ref_logprobs, kind)_t    at valid tokens, 0 elsewhere
        token_rewards = token_scores - coef * kl_t                     at valid tokens, 0 elsewhere
        mean_kl       = mean over rows with a valid token of (mean of kl_t over the row's valid tokens)

    As verl's ``apply_kl_penalty`` (``kind`` 'k1' is verl's default "kl"), whose ``current_kl`` is
    the same per-sequence mean averaged over all B rows: the two differ only when a row has no valid
    token (verl counts it as 0 KL). verl passes scores at invalid tokens through unchanged (they are 0
    there); here they become 0. Nothing is detached: pass detached logprobs.
    """
    if not (token_scores.shape == logprobs.shape == ref_logprobs.shape == mask.shape) or mask.dim() != 2:
        raise ValueError(
            "token_scores, logprobs, ref_logprobs and mask must have one shape (B, T); got "
            f"{tuple(token_scores.shape)}, {tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, {tuple(mask.shape)}"
        )
    check_range("coef", coef, low=0.0)
    valid = mask.bool()
    zeros = torch.zeros_like(token_scores)
    kl = torch.where(valid, kl_penalty(logprobs, ref_logprobs, kind).to(token_scores.dtype), zeros)
    token_rewards = torch.where(valid, token_scores - coef * kl, zeros)
    num_tokens = valid.sum(dim=-1)  # (B,)
    row_means = kl.sum(dim=-1) / num_tokens.clamp_min(1).to(kl.dtype)
    num_rows = (num_tokens > 0).sum().to(kl.dtype)
    return token_rewards, row_means.sum() / num_rows.clamp_min(1)


class FixedKLController:
    """A constant KL coefficient (verl's ``FixedKLController``); ``update`` does nothing."""

    def __init__(self, coef: float) -> None:
        check_range("kl_controller coef", coef, low=0.0)
        self.value = float(coef)
        """The coefficient to use now."""

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (same signature as ``AdaptiveKLController.update``)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _read_value(state)


class AdaptiveKLController:
    """The coefficient steered towards a target KL (Ziegler et al. 2019, arXiv 1909.08593; verl's
    ``AdaptiveKLController``). After each batch:

        e     = clip(current_kl / target_kl - 1, -0.2, 0.2)
        value = value * (1 + e * n_steps / horizon)

    so the coefficient grows while the KL is above target and shrinks while below, by at most
    ``0.2 * n_steps / horizon`` per update. verl (and TRL) pass the number of sequences in the
    batch as ``n_steps``; ``horizon`` is then in sequences (verl's default 10000).
    """

    def __init__(self, init_coef: float, target_kl: float, horizon: float) -> None:
        check_range("kl_controller init_coef", init_coef, low=0.0, low_inclusive=False)
        check_range("kl_controller target_kl", target_kl, low=0.0, low_inclusive=False)
        check_range("kl_controller horizon", horizon, low=0.0, low_inclusive=False)
        self.value = float(init_coef)
        """The coefficient to use now (the state; target and horizon are settings)."""
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` after a batch whose mean KL was ``current_kl`` (a plain float) over ``n_steps``."""
        check_range("current_kl", current_kl)
        check_range("n_steps", n_steps, low=0, integer=True)
        error = min(max(current_kl / self.target_kl - 1, -ADAPTIVE_KL_ERROR_LIMIT), ADAPTIVE_KL_ERROR_LIMIT)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _read_value(state)


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(kind: str, *, coef: float, target_kl: float = 0.1, horizon: float = 10000) -> KLController:
    """``kind`` 'fixed' (``coef`` throughout) or 'adaptive' (starting at ``coef``, steered towards
    ``target_kl`` over ``horizon``); defaults as verl's ``algorithm.kl_ctrl``. Raises ValueError naming
    an unknown ``kind``."""
    check_choice("kl_controller", kind, KL_CONTROLLERS)
    if kind == "fixed":
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target_kl, horizon)


def _read_value(state: dict[str, float]) -> float:
    if not isinstance(state, dict) or "value" not in state:
        raise ValueError(f"a KL controller state must be a dict with a 'value'; got {state!r}")
    check_range("kl_controller value", state["value"], low=0.0)
    return float(state["value"])
