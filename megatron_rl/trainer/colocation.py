"""Device memory handed between the colocated rollout engine and the trainer, phase by phase.

One rank's order in a step (the order verl's and slime's colocated modes use)::

    generate                 engine awake; optimizer state + gradient buffers on the host (if offloaded)
    sleep_engine()           the engine drops its KV cache and offloads its weights
    logprobs                 the reference is on the device only for its forward (if offloaded)
    optimizer_to_device()    optimizer state and gradient buffers back on the device
    update
    optimizer_to_host()
    push_weights():  engine.wake_up(["weights"]) -> weight push (+ check) -> engine.wake_up(["kv_cache"])
    validation / next generate   engine awake again

At start the engine is put to sleep as soon as it is built (the trainer then loads a checkpoint or
runs the SFT warm-up and builds the reference), and the first push wakes it the same way. Ranks
without an engine (those that never generate) skip the engine calls; the optimizer and reference
calls happen on every rank. Where vLLM has no sleep mode (CPU) the engine calls free nothing but are
made all the same, and the engine still refuses to generate asleep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from megatron_rl.megatron.offload import OptimizerOffload
from megatron_rl.megatron.reference import offload_reference, reference_on_device

__all__ = ["Colocation", "resolve_offload"]


def resolve_offload(field: str, mode: str, *, auto: bool) -> bool:
    """``memory.offload_*``: 'on' -> True, 'off' -> False, 'auto' -> ``auto``."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{field}={mode!r} must be one of 'auto', 'on', 'off'")
    return auto if mode == "auto" else mode == "on"


class Colocation:
    """The calls that move memory between the phases of a step (see the module). The reference and
    the optimizer offload are added once they exist (:meth:`add_reference`, :meth:`add_optimizer_offload`).

    Args:
        engine: the engine this rank feeds with weights (None on the ranks that never generate).
        sleeps: whether the engine shares this rank's device and sleeps between generations
            (``rollout.mode=colocated``); a separate engine has its own GPU and is never put to sleep.
    """

    def __init__(self, engine: Any, *, sleeps: bool = True) -> None:
        self.engine = engine
        self.sleeps = sleeps and engine is not None
        self.optimizer_offload: OptimizerOffload | None = None
        self.reference: torch.nn.Module | None = None
        self.offload_reference = False

    def add_reference(self, reference: torch.nn.Module | None, *, offload: bool) -> None:
        """The frozen reference (None: none); ``offload``: keep it in host memory between its forwards
        (moved there now)."""
        self.reference = reference
        self.offload_reference = offload and reference is not None
        if self.offload_reference:
            offload_reference(reference)

    def add_optimizer_offload(self, offload: OptimizerOffload) -> None:
        """Move the optimizer state and gradient buffers to the host now and between updates."""
        self.optimizer_offload = offload
        offload.to_host()

    def sleep_engine(self) -> None:
        """After generation (and once at start): the engine frees its KV cache and weights."""
        if self.sleeps:
            self.engine.sleep()

    @contextlib.contextmanager
    def reference_on_device(self) -> Iterator[torch.nn.Module | None]:
        """The reference, on the device for the body (back in host memory afterwards if offloaded)."""
        if self.reference is None:
            yield None
            return
        with reference_on_device(self.reference, offload=self.offload_reference) as reference:
            yield reference

    def optimizer_to_device(self) -> dict[str, float]:
        """Before the update: optimizer state and gradient buffers back on the device (if offloaded)."""
        return self.optimizer_offload.to_device() if self.optimizer_offload is not None else {}

    def optimizer_to_host(self) -> dict[str, float]:
        """After the update (and once at start): optimizer state to host memory, gradient buffers freed."""
        return self.optimizer_offload.to_host() if self.optimizer_offload is not None else {}

    def push_weights(self, sync: Any, *, check: bool = False) -> dict[str, float]:
        """Wake the engine's weights, push the trainer's weights into them (collective over the replica;
        ``check``: then compare every engine weight with the trainer's), then wake the KV cache.
        Returns the push's metrics (:meth:`~megatron_rl.weight_sync.WeightSync.push`)."""
        if self.sleeps:
            self.engine.wake_up(tags=["weights"])
        metrics = sync.push(self.engine)
        if check:
            sync.check(self.engine)
        if self.sleeps:
            self.engine.wake_up(tags=["kv_cache"])
        return metrics
