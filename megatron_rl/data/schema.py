"""The verl / Med-U1 parquet row, checked field by field on read and typed on write.

A row::

    data_source   str                      which benchmark; picks the reward (megatron_rl.rewards)
    prompt        [{role, content}, ...]   chat messages, or ONE user message already
                                           chat-templated (the Med-U1 files)
    ability       str                      "medical"
    reward_model  {style, ground_truth, num_tokens, lower_limit, upper_limit}
    extra_info    {split, index}

``num_tokens``: N > 0 "Think for N tokens.", -N "Think for maximum N tokens.", -1 none.
Every error names the file, the row index, the field and the value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_rl.rewards.score import NO_LENGTH_CONTROL, TASK_OF_SOURCE

ROLES = ("system", "user", "assistant")
REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")
# A message holding one of these was rendered by a chat template already (Qwen/ChatML,
# Llama 3, Mistral): it is used as it is, never templated twice.
TEMPLATE_MARKERS = ("<|im_start|>", "<|start_header_id|>", "<|begin_of_text|>", "[INST]")

ARROW_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([
        ("ground_truth", pa.string()), ("lower_limit", pa.string()), ("num_tokens", pa.int64()),
        ("style", pa.string()), ("upper_limit", pa.string()),
    ])),
    ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
])  # fmt: skip
"""The column types written by this project (those of the Med-U1 files, limits as strings)."""


@dataclass(frozen=True)
class PromptRow:
    """One checked row."""

    data_source: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    ground_truth: str
    num_tokens: int = NO_LENGTH_CONTROL
    lower_limit: str | None = None
    upper_limit: str | None = None
    split: str = "train"
    index: int = 0
    ability: str = "medical"
    style: str = "rule"

    @property
    def is_templated(self) -> bool:
        """True for a single user message that a chat template has rendered already."""
        return (
            len(self.messages) == 1
            and self.messages[0][0] == "user"
            and any(marker in self.messages[0][1] for marker in TEMPLATE_MARKERS)
        )

    def to_record(self) -> dict:
        """The row as the parquet schema stores it."""
        return {
            "data_source": self.data_source,
            "prompt": [{"content": content, "role": role} for role, content in self.messages],
            "ability": self.ability,
            "reward_model": {
                "ground_truth": self.ground_truth, "lower_limit": self.lower_limit, "num_tokens": self.num_tokens,
                "style": self.style, "upper_limit": self.upper_limit,
            },
            "extra_info": {"index": self.index, "split": self.split},
        }  # fmt: skip


class RowError(ValueError):
    """A row that does not fit the schema; the message names file, row, field and value."""


def field_error(where: str, field: str, value: object, expected: str) -> RowError:
    """``RowError("<where>: <field>=<value, shortened> <expected>")``."""
    shown = repr(value)
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    return RowError(f"{where}: {field}={shown} {expected}")


def row_from_record(record: dict, *, where: str) -> PromptRow:
    """Check one parquet record; ``where`` (e.g. "train.parquet: row 12") starts every error."""

    def fail(field: str, value: object, expected: str) -> RowError:
        return field_error(where, field, value, expected)

    source = record.get("data_source")
    if not isinstance(source, str) or source not in TASK_OF_SOURCE:  # a list or dict is no key
        raise fail("data_source", source, f"is not a known data_source; known: {', '.join(sorted(TASK_OF_SOURCE))}")
    prompt = record.get("prompt")
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise fail("prompt", prompt, "must be a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(prompt):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise fail(f"prompt[{i}].role", role, f"must be one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise fail(f"prompt[{i}].content", content, "must be a non-empty string")
        messages.append((role, content))
    reward = record.get("reward_model")
    if not isinstance(reward, dict):
        raise fail("reward_model", reward, "must be a struct with ground_truth, num_tokens, lower_limit, upper_limit")
    truth = reward.get("ground_truth")
    if not isinstance(truth, str) or not truth.strip():
        raise fail("reward_model.ground_truth", truth, "must be a non-empty string")
    num_tokens = reward.get("num_tokens", NO_LENGTH_CONTROL)
    num_tokens = NO_LENGTH_CONTROL if num_tokens is None else num_tokens
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens == 0:
        raise fail("reward_model.num_tokens", num_tokens, "must be a non-zero integer (-1: no length instruction)")
    limits = []
    for field in ("lower_limit", "upper_limit"):
        value = reward.get(field)
        if value is not None and not isinstance(value, (str, int, float)):
            raise fail(f"reward_model.{field}", value, "must be a number, a string or null")
        limits.append(None if value is None else str(value))
    extra = record.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise fail("extra_info", extra, "must be a struct with split and index")
    index = extra.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise fail("extra_info.index", index, "must be an integer")
    return PromptRow(
        data_source=source, messages=tuple(messages), ground_truth=truth, num_tokens=num_tokens,
        lower_limit=limits[0], upper_limit=limits[1], split=str(extra.get("split") or "train"), index=index,
        ability=str(record.get("ability") or "medical"), style=str(reward.get("style") or "rule"),
    )  # fmt: skip


@dataclass(frozen=True)
class SkippedRow:
    """A row left out with ``skip_bad_rows``, and why."""

    file: str
    row: int
    reason: str


def read_rows(
    path: str | Path, *, skip_bad_rows: bool = False, check: Callable[[PromptRow, str], None] | None = None
) -> tuple[list[PromptRow], list[SkippedRow]]:
    """Every row of one parquet file, checked. A bad row raises ``RowError`` unless
    ``skip_bad_rows``, in which case it is left out and reported in the second list.
    ``check(row, where)``: a further test of each row that raises ``RowError`` (e.g. one that
    needs the tokenizer), applied in the same order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"parquet file {str(path)!r} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: not a readable parquet file: {err}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.column_names)}")
    rows, skipped = [], []
    for index, record in enumerate(table.to_pylist()):
        try:
            where = f"{path}: row {index}"
            row = row_from_record(record, where=where)
            if check is not None:
                check(row, where)
            rows.append(row)
        except RowError as err:
            if not skip_bad_rows:
                raise
            skipped.append(SkippedRow(str(path), index, str(err).split(": ", 2)[-1]))
    return rows, skipped


def write_rows(path: str | Path, rows: Iterable[PromptRow]) -> int:
    """Write rows with the project's column types, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([row.to_record() for row in rows], schema=ARROW_SCHEMA)
    temp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temp)
    temp.replace(path)
    return table.num_rows


def read_many(paths: Sequence[str | Path], *, skip_bad_rows: bool = False) -> tuple[list[PromptRow], list[SkippedRow]]:
    """``read_rows`` over several files, in order."""
    rows, skipped = [], []
    for path in paths:
        file_rows, file_skipped = read_rows(path, skip_bad_rows=skip_bad_rows)
        rows += file_rows
        skipped += file_skipped
    return rows, skipped
