"""The frozen reference model (same TP/PP layout as the policy, no gradients) and the step-0 check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_rl.megatron.forward import forward_logprobs
from megatron_rl.megatron.optim import unwrap_ddp

__all__ = [
    "check_reference_matches_policy",
    "freeze_reference",
    "offload_reference",
    "onload_reference",
    "reference_on_device",
]


def freeze_reference(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` (a GPTModel stage built like the policy's, with the same weights loaded) the
    reference: eval mode, never given to an optimizer, only run under ``torch.no_grad`` (as
    :func:`megatron_rl.megatron.forward.forward_logprobs` does), so it never holds gradients.

    Its parameters deliberately keep ``requires_grad=True``: Megatron's TP linear layers switch to
    another implementation (``linear_with_frozen_weight``) for frozen weights, whose fp32 results differ
    from the policy's by ~1e-5 at TP > 1 (measured), and the step-0 KL would then not be exactly 0.
    Returns the same object."""
    model.eval()
    return model


def check_reference_matches_policy(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
) -> torch.Tensor:
    """Step-0 check: before any update the policy's logprobs must equal the reference's bit for bit
    (same weights, same layout, same kernels: KL(policy, reference) is exactly 0).

    Returns the reference logprobs (B, T-1). Raises ValueError with the largest difference otherwise
    (a weight that was not loaded into one of them, or a different layout). Collective: every rank calls it.
    """
    policy_logprobs = forward_logprobs(unwrap_ddp(policy), input_ids, vocab_size=vocab_size,
                                       temperature=temperature, micro_batch_size=micro_batch_size).logprobs
    ref_logprobs = forward_logprobs(reference, input_ids, vocab_size=vocab_size, temperature=temperature,
                                    micro_batch_size=micro_batch_size).logprobs
    if not torch.equal(policy_logprobs, ref_logprobs):
        diff = (policy_logprobs - ref_logprobs).abs().max().item()
        raise ValueError(f"policy and reference logprobs differ before the first update (max |diff| {diff:.3e}): "
                         "the two models do not hold the same weights in the same layout")
    return ref_logprobs


def _compute_device() -> torch.device:
    """Where Megatron runs this process's layers: the current CUDA device, or the CPU without CUDA."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


_HOST_COPIES = "_megatron_rl_host_copies"
"""Attribute of an offloaded reference: its pinned host copies, kept while it is on the device."""


def _move(model: torch.nn.Module, device: torch.device) -> int:
    """Move every parameter and buffer of ``model`` to ``device`` in place (``tensor.data`` is replaced,
    so the Parameter objects and any references to them stay valid). Host copies are pinned, so the
    transfer back to the GPU can overlap, and kept while the model is on the device: the reference never
    changes, so every offload after the first frees the device copy without copying anything back.
    Returns the number of tensors that changed device."""
    moved = 0
    host_copies: dict[int, torch.Tensor] = model.__dict__.setdefault(_HOST_COPIES, {})
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device == device:
            continue
        if device.type == "cpu":
            host = host_copies.get(id(tensor))
            if host is None:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
                host.copy_(tensor.data)
                host_copies[id(tensor)] = host
            tensor.data = host
        else:
            tensor.data = tensor.data.to(device, non_blocking=True)
        moved += 1
    if moved and torch.cuda.is_available():
        torch.cuda.synchronize()
    return moved


def offload_reference(model: torch.nn.Module) -> int:
    """Move the frozen reference's parameters and buffers to (pinned) CPU memory, freeing their GPU
    memory between the reference's forwards. Without CUDA they already live on the CPU: nothing moves.

    Returns the number of tensors moved (0 on a CPU-only machine or when already offloaded)."""
    return _move(model, torch.device("cpu"))


def onload_reference(model: torch.nn.Module) -> int:
    """Move the reference's parameters and buffers back to the compute device (the current CUDA device,
    or the CPU without CUDA: then nothing moves). Returns the number of tensors moved."""
    return _move(model, _compute_device())


@contextlib.contextmanager
def reference_on_device(model: torch.nn.Module, *, offload: bool = True) -> Iterator[torch.nn.Module]:
    """Run the reference's forward on the compute device and, with ``offload``, keep it in CPU memory
    otherwise::

        with reference_on_device(reference, offload=offload) as ref:  # offload: memory.offload_reference
            ref_logprobs = forward_logprobs(ref, input_ids, vocab_size=vocab)

    With ``offload=False`` the model is only checked to be on the compute device (onloaded if not).
    The weights are offloaded again even when the body raises."""
    onload_reference(model)
    try:
        yield model
    finally:
        if offload:
            offload_reference(model)
