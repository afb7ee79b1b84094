"""Memory: the ``memory`` config section and the per-rank, per-phase memory plan of a run
(``megatron-rl plan``; checked at train start). See docs/memory.md."""

from megatron_rl.memory.config import OFFLOAD_MODES, MemoryConfig
from megatron_rl.memory.plan import (
    PHASES,
    InsufficientMemoryError,
    MemoryPlan,
    check_run_fits,
    hf_config_for,
    plan_run,
)

__all__ = [
    "OFFLOAD_MODES",
    "PHASES",
    "InsufficientMemoryError",
    "MemoryConfig",
    "MemoryPlan",
    "check_run_fits",
    "hf_config_for",
    "plan_run",
]
