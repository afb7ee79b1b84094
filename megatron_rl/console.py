"""A quiet console: the libraries' known-harmless start-up warnings, listed and filtered in one place.

Every ``megatron-rl`` command calls :func:`install` first, before torch, Megatron or vLLM are
imported (several of these warnings are raised at import time). Each entry of :data:`HARMLESS`
names one message exactly (a regular expression matched at the start of the message), where it
comes from and why it changes nothing for this project. Nothing else is filtered: an unknown
warning, every error and the project's own progress lines stay visible.

``megatron-rl --verbose ...`` (anywhere on the command line) or ``MEGATRON_RL_VERBOSE=1`` installs
nothing and sets vLLM's log level to INFO, so every library speaks as it would on its own.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import warnings
from dataclasses import dataclass

__all__ = ["HARMLESS", "VERBOSE_ENV", "Harmless", "install", "verbose_from_env"]

VERBOSE_ENV = "MEGATRON_RL_VERBOSE"
"""Set to 1 (or true / yes) to show every library's warnings, as ``--verbose`` does."""


@dataclass(frozen=True)
class Harmless:
    """One known-harmless message and how it reaches the console."""

    channel: str
    """'warnings' (Python's warnings module, ``category``), 'logging' (the Python logger ``source``)
    or 'c++' (torch's C++ logging, which can only be silenced by level: see :func:`install`)."""
    source: str
    """Who says it: the module that warns, or the logger's name."""
    message: str
    """A regular expression matched at the start of the message."""
    why: str
    """Why the message changes nothing for this project."""
    category: type[Warning] = UserWarning


HARMLESS: tuple[Harmless, ...] = (
    Harmless("warnings", "megatron.core (optimizer, distributed, models)",
             r"Transformer Engine and Apex are not installed\. Falling back to",
             "Megatron then uses its local torch implementations (optimizer, multi-tensor ops), which are "
             "what this project runs and tests on CPU; model.layer_spec=te names Transformer Engine "
             "explicitly and fails loudly without it."),
    Harmless("warnings", "megatron.core.models", r"Apex is not installed\. Falling back to Torch Norm",
             "torch's own LayerNorm/RMSNorm computes the same norm (the converters' round trips are exact)."),
    Harmless("warnings", "megatron.core.transformer.transformer_config",
             r"full scope is deprecated\. Use empty cuda_graph_scope",
             "Megatron warns about its own default (cuda_graph_scope='full'); this project never captures "
             "CUDA graphs in the trainer."),
    Harmless("warnings", "vllm.triton_utils.dispatcher", r"`torch\.distributed\.reduce_op` is deprecated",
             "vLLM reads every attribute of torch.distributed while looking for Triton kernels and so touches "
             "the deprecated alias; nothing calls it.", category=FutureWarning),
    Harmless("logging", "vllm.triton_utils.importing", r"Triton is installed, but doesn't include CPU backend",
             "vLLM's CPU build computes with its own C++ kernels; the Triton that torch ships is the GPU one."),
    Harmless("logging", "vllm.platforms.cpu", r"Triton is not installed\. triton-cpu is expected on x86 CPUs",
             "triton-cpu only serves vLLM's V2 model runner; the V1 runner (the one tested here) needs none."),
    Harmless("logging", "vllm.config.vllm", r"Model Runner V2 requires Triton; using the V1 model runner",
             "the V1 model runner is the one this project's engine tests run on."),
    Harmless("logging", "vllm.platforms.cpu", r"Reset SSM cache type to float32 for accelerated GDN mamba",
             "concerns the state cache of Mamba/GDN layers; the models trained here (Qwen2, Llama) have none."),
    Harmless("c++", "vllm._C (init_cpu_memory_env, via torch's C++ logging)",
             r"NUMA binding: Using MEMBIND policy for memory allocation",
             "vLLM's CPU worker keeps its memory on the NUMA node of its cores, as intended. torch prints "
             "C++ warnings itself, so with vLLM's CPU build installed this message is silenced by level "
             "(TORCH_CPP_LOG_LEVEL=ERROR), which hides torch's other C++-side warnings too; Python-side "
             "torch warnings and every C++ error still show. Unset on GPU installs."),
)
"""Every message the console filters, with why it is harmless."""


def verbose_from_env() -> bool:
    """Whether ``MEGATRON_RL_VERBOSE`` asks for every warning (1, true, yes, on)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _MessageFilter(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``patterns``."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def install(verbose: bool | None = None) -> bool:
    """Filter the :data:`HARMLESS` messages in this process (and, through the environment, in the
    processes it starts: vLLM's and torch's log levels); return whether the console is verbose.

    ``verbose`` None reads ``MEGATRON_RL_VERBOSE``. Verbose: nothing is filtered and vLLM logs at
    INFO. Otherwise vLLM logs at ERROR (its per-step INFO lines and the warnings it repeats on every
    weight push would run through the progress bar; the trainer's metrics report what matters) unless
    ``VLLM_LOGGING_LEVEL`` is set already. Call it before torch, Megatron or vLLM is imported.
    Idempotent."""
    verbose = verbose_from_env() if verbose is None else verbose
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        return True
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    for item in HARMLESS:
        if item.channel == "warnings":
            warnings.filterwarnings("ignore", message=item.message, category=item.category)
    by_logger: dict[str, list[str]] = {}
    for item in HARMLESS:
        if item.channel == "logging":
            by_logger.setdefault(item.source, []).append(item.message)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)  # the same object vLLM's init_logger(name) returns later
        if not any(isinstance(f, _MessageFilter) for f in logger.filters):
            logger.addFilter(_MessageFilter(patterns))
    if _has_vllm_cpu_build():
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # read once, when torch is imported
    return False


def _has_vllm_cpu_build() -> bool:
    """Whether vLLM's CPU build (the ``vllm-cpu`` distribution) is installed; nothing is imported."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
