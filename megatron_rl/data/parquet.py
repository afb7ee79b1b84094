"""Reading rows of the verl / Med-U1 parquet schema, checked field by field.

A row: ``data_source``, ``prompt`` [{role, content}], ``ability``, ``reward_model`` {style,
ground_truth, num_tokens, lower_limit, upper_limit}, ``extra_info`` {split, index}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

NO_LENGTH_CONTROL = -1


@dataclass(frozen=True)
class RewardSpec:
    """What the reward needs from one parquet row."""

    row: int
    data_source: str
    ground_truth: str
    lower_limit: str | None
    upper_limit: str | None
    num_tokens: int


def read_reward_specs(path: str | Path) -> list[RewardSpec]:
    """The reward fields of every row in ``path``; ValueError naming file, row and field if bad."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"parquet file {str(path)!r} does not exist")
    try:
        table = pq.read_table(path, columns=["data_source", "reward_model"])
    except Exception as err:  # pyarrow raises several types for unreadable or column-less files
        raise ValueError(f"{path}: cannot read data_source and reward_model columns: {err}") from None
    specs = []
    for index, (source, reward) in enumerate(zip(table.column("data_source").to_pylist(),
                                                 table.column("reward_model").to_pylist())):
        where = f"{path}: row {index}"
        if not isinstance(source, str) or not source:
            raise ValueError(f"{where}: data_source={source!r} must be a non-empty string")
        if not isinstance(reward, dict) or reward.get("ground_truth") is None:
            raise ValueError(f"{where}: reward_model.ground_truth is missing (reward_model={reward!r})")
        num_tokens = reward.get("num_tokens")
        num_tokens = NO_LENGTH_CONTROL if num_tokens is None else num_tokens
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise ValueError(f"{where}: reward_model.num_tokens={num_tokens!r} must be an integer")
        specs.append(RewardSpec(index, source, str(reward["ground_truth"]), _optional_str(reward.get("lower_limit")),
                                _optional_str(reward.get("upper_limit")), num_tokens))
    return specs


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)
