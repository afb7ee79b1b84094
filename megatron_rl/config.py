"""The run configuration: one typed dataclass per component, filled from YAML and dotted overrides.

Defaults live only in the component dataclasses (``RewardConfig`` in ``rewards/config.py``, ...);
``Config`` gathers them into sections. A YAML file fills some fields and may name a ``base``
file it derives from; ``section.field=value`` overrides from the command line come last::

    cfg = load_config("examples/medu1_qwen2.5_3b.yaml", ["reward.threshold=50"])

Unknown keys, values of the wrong type and values a component rejects all raise ``ValueError``
naming the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from megatron_rl.cluster.config import ClusterConfig
from megatron_rl.data.config import DataConfig
from megatron_rl.megatron.critic import CriticConfig
from megatron_rl.megatron.optim import OptimizerSettings
from megatron_rl.memory.config import MemoryConfig
from megatron_rl.rewards.config import RewardConfig
from megatron_rl.trainer.config import AlgorithmConfig, ModelConfig, ParallelConfig, RolloutConfig, TrainerConfig

T = TypeVar("T")

BASE_KEY = "base"
"""A YAML file may start with ``base: other.yaml`` (relative to itself) to derive from it."""


@dataclass
class Config:
    """Everything a run needs, one section per component."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """How responses are scored (megatron_rl.rewards)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Which prompts are read and how they are batched (megatron_rl.data)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="tiny"))
    """The policy to start from (megatron_rl.trainer.config)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes of the policy."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How responses are sampled."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantages, loss, batch splitting."""

    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    """AdamW (megatron_rl.megatron.optim; Med-U1 defaults)."""

    critic: CriticConfig = field(default_factory=CriticConfig)
    """The value model of PPO with a critic, used with algorithm.advantage=gae (megatron_rl.megatron.critic)."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The loop: steps, output directory, validation, checkpoints, sinks."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray actors for multi-node runs (megatron_rl.cluster; used by its launch and separate engines)."""

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The memory plan check at start and the offload switches (megatron_rl.memory; docs/memory.md)."""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type[T] = Config) -> T:
    """Build ``schema`` from its defaults, then the YAML file at ``path``, then ``overrides``."""
    layers = [OmegaConf.structured(schema)]
    if path is not None:
        layers.extend(_yaml_layers(Path(path), seen=()))
    layers.append(_dotlist(overrides))
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)  # runs every __post_init__
    except ConfigKeyError as err:
        raise ValueError(_unknown_key_message(schema, err.full_key)) from None
    except OmegaConfBaseException as err:
        where = f"{err.full_key}: " if getattr(err, "full_key", None) else ""
        raise ValueError(f"bad config value: {where}{str(err).splitlines()[0]}") from None


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (written next to every run's outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _yaml_layers(path: Path, seen: tuple[Path, ...]) -> list[DictConfig]:
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ValueError(f"config files derive from each other in a cycle: {chain}")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    layer = OmegaConf.load(path)
    if not isinstance(layer, DictConfig):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got a list")
    layers = []
    if BASE_KEY in layer:
        base = Path(str(layer.pop(BASE_KEY)))
        layers = _yaml_layers(base if base.is_absolute() else path.parent / base, (*seen, resolved))
    return [*layers, layer]


def _dotlist(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.field=value (e.g. reward.threshold=50)")
    return OmegaConf.from_dotlist(list(overrides))


def _unknown_key_message(schema: type, full_key: str) -> str:
    """Name the unknown key and the keys that its parent section does accept."""
    parts = str(full_key).split(".")
    node: Any = schema
    for part in parts[:-1]:
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
    known = sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
    section = ".".join(parts[:-1]) or "the top level"
    return f"unknown config key {full_key!r}; {section} accepts: {', '.join(known)}"
