"""Which device a run trains on (``trainer.device``), decided once, before anything touches CUDA, and
said in the run's first line of output.

* ``cuda``: this process's GPU (``cuda:LOCAL_RANK``); a host where CUDA does not work stops here, with
  the reason (a CPU build of torch, no device visible, the driver's own message).
* ``cpu``: the CPU, also on a GPU host (the GPUs are hidden from this process:
  ``CUDA_VISIBLE_DEVICES=''``, so every later ``torch.cuda.is_available()`` agrees).
* ``auto``: CUDA where it works, else the CPU -- except on a host that is plainly meant to use its
  GPU (an NVIDIA device is present and torch is a CUDA build) but where CUDA fails: that run stops
  with the reason instead of silently becoming a CPU run.

``optim.bf16=true`` on the CPU is refused here (the CPU path is fp32 throughout); recipes that ask
for bf16 still load on CPU, only a run refuses them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import torch

__all__ = ["DeviceChoice", "choose_device", "cuda_problem", "nvidia_device_present"]

NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/proc/driver/nvidia/version")
"""Files whose presence says the host has an NVIDIA GPU and driver (with ``nvidia-smi`` on PATH)."""


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    """The device of a run and why it was chosen."""

    device: str
    """'cuda' or 'cpu'."""
    reason: str

    def line(self) -> str:
        """The run's first line of output, e.g. ``device: cpu (trainer.device=auto: torch 2.13.0+cpu is a
        CPU build, without CUDA)``."""
        return f"device: {self.device} ({self.reason})"


def nvidia_device_present() -> str | None:
    """What shows that this host has an NVIDIA GPU (a device file, the driver's /proc entry or
    ``nvidia-smi``), or None."""
    for path in NVIDIA_DEVICE_FILES:
        if os.path.exists(path):
            return path
    return shutil.which("nvidia-smi")


def cuda_problem(local_rank: int = 0) -> str | None:
    """Why this process cannot compute on ``cuda:local_rank`` (None: it can). Runs a one-element
    allocation there, so a device that is visible but broken is caught too."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build, without CUDA"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        said = "; ".join(str(w.message).strip() for w in caught)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable CUDA device{where}"
                + (f": {said}" if said else ""))
    count = torch.cuda.device_count()
    if local_rank >= count:
        return f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible"
    try:
        torch.zeros(1, device=f"cuda:{local_rank}")
    except RuntimeError as err:
        return f"an allocation on cuda:{local_rank} failed: {str(err).splitlines()[0]}"
    return None


def choose_device(requested: str, *, bf16: bool) -> DeviceChoice:
    """Decide the run's device (see the module); call before anything else touches CUDA.

    Args:
        requested: ``trainer.device``: 'auto', 'cuda' or 'cpu'.
        bf16: ``optim.bf16``.

    Raises:
        RuntimeError: 'cuda' where CUDA does not work; 'auto' on a GPU host whose CUDA does not work;
            'cpu' in a process that had already started CUDA (the GPUs can no longer be hidden).
        ValueError: ``optim.bf16=true`` with the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if torch.cuda.is_available():
            raise RuntimeError("trainer.device=cpu, but CUDA was already started in this process before the "
                               "trainer (its GPUs can no longer be hidden); start the run with CUDA_VISIBLE_DEVICES=''")
        choice = DeviceChoice("cpu", "trainer.device=cpu")
    else:
        problem = cuda_problem(local_rank)
        if requested == "cuda":
            if problem is not None:
                raise RuntimeError(f"trainer.device=cuda, but CUDA does not work here: {problem}. Fix the GPU "
                                   "setup (README, 'On a GPU cluster'), or set trainer.device=cpu to train on the CPU")
            choice = DeviceChoice("cuda", f"trainer.device=cuda: cuda:{local_rank} of {torch.cuda.device_count()}")
        elif problem is None:
            choice = DeviceChoice("cuda", f"trainer.device=auto: CUDA works, cuda:{local_rank} of "
                                          f"{torch.cuda.device_count()} ({torch.cuda.get_device_name(local_rank)})")
        else:
            evidence = nvidia_device_present() if torch.version.cuda is not None else None
            if evidence is not None:
                raise RuntimeError(
                    f"trainer.device=auto: this host has an NVIDIA GPU ({evidence}) and torch {torch.__version__} "
                    f"is a CUDA build, but CUDA does not work: {problem}. Refusing to fall back to the CPU "
                    "silently; fix the GPU setup (driver, CUDA_VISIBLE_DEVICES), or set trainer.device=cpu")
            choice = DeviceChoice("cpu", f"trainer.device=auto: {problem}")
    if bf16 and choice.device == "cpu":
        raise ValueError(f"optim.bf16=true needs CUDA, but this run trains on the CPU ({choice.reason}); "
                         "set optim.bf16=false (the CPU path is fp32 throughout)")
    return choice
