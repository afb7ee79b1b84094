"""The ``memory`` section of a run: whether the memory plan is checked at start, the device size to plan
for, and the two offload switches (reference model, optimizer state and gradient buffers).

The plan itself is :mod:`megatron_rl.memory.plan`; ``docs/memory.md`` explains its terms.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.validation import check_choice, check_range

OFFLOAD_MODES = ("auto", "on", "off")
"""Values of ``memory.offload_reference`` and ``memory.offload_optimizer`` (YAML's bare on / off, read as
booleans, are taken as 'on' / 'off')."""


@dataclass(frozen=True)
class MemoryConfig:
    """What the trainer does to stay within device memory, and whether it checks the plan first."""

    check: bool = True
    """Refuse at start (before any model is built) a run whose memory plan does not fit the device:
    ``torch.cuda.mem_get_info`` on GPU, available RAM on CPU (shared by the ranks of one host).
    The refusal names the largest items and the settings that would shrink them."""

    device_memory_gib: float = 0.0
    """Memory per device (GiB) to plan for; 0 uses the device's own total (GPU) or the host's
    available RAM (CPU). Set it to plan for a smaller device than the one at hand."""

    offload_reference: str = "auto"
    """Keep the frozen reference model in (pinned) host memory between its forwards and copy it to
    the device only for them: 'on', 'off', or 'auto' (on where CUDA is present; on CPU host and
    device memory are the same, so there is nothing to gain)."""

    offload_optimizer: str = "auto"
    """Move the fp32 optimizer state (master weights, Adam moments) and the gradient buffers to host
    memory while the engine generates and back before the update: 'on', 'off', or 'auto' (on only
    when the memory plan does not fit without it)."""

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare on / off as true / false, which a str field receives as 'True' / 'False'
        for name in ("offload_reference", "offload_optimizer"):
            value = getattr(self, name)
            if value is True or value == "True":
                object.__setattr__(self, name, "on")
            elif value is False or value == "False":
                object.__setattr__(self, name, "off")
        if not isinstance(self.check, bool):
            raise ValueError(f"memory.check={self.check!r} must be true or false")
        check_range("memory.device_memory_gib", self.device_memory_gib, low=0.0)
        check_choice("memory.offload_reference", self.offload_reference, OFFLOAD_MODES)
        check_choice("memory.offload_optimizer", self.offload_optimizer, OFFLOAD_MODES)
