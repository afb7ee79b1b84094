"""Scoring files of responses and summarising accuracy per data source (``megatron-rl score``)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from megatron_rl.data.schema import NO_LENGTH_CONTROL, PromptRow, read_rows
from megatron_rl.rewards.score import RewardResult, task_of


def rows_from_files(
    parquet_path: str | Path,
    responses_path: str | Path,
    *,
    count_tokens: Callable[[str], int] | None = None,
    use_length: bool = True,
) -> list[dict[str, object]]:
    """Join a parquet of prompts with a JSONL of responses into rows for ``score_batch``.

    Each JSONL line is ``{"response": str}`` plus optionally ``"row"`` (the parquet row it
    answers; without it line k answers row k) and ``"response_num_tokens"`` (else counted with
    ``count_tokens`` where a row is length-controlled). With ``use_length=False`` the length
    term is left out. Errors name the file, the line and the field.
    """
    specs, _ = read_rows(parquet_path)
    rows = []
    any_row_field = False
    for line_number, record in _jsonl(responses_path):
        any_row_field = any_row_field or "row" in record
        where = f"{responses_path}: line {line_number}"
        index = record.get("row", len(rows))
        if "row" not in record and index >= len(specs):
            raise ValueError(
                f"{where}: more responses than the {len(specs)} rows of {parquet_path}; "
                "give each line a \"row\" field to score several responses per row"
            )
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(specs):
            raise ValueError(f"{where}: row={index!r} must be an integer in [0, {len(specs)})")
        if "response" not in record:
            raise ValueError(f"{where}: missing field 'response'")
        spec = specs[index]
        num_tokens = spec.num_tokens if use_length else NO_LENGTH_CONTROL
        used = record.get("response_num_tokens")
        if num_tokens != NO_LENGTH_CONTROL and used is None:
            if count_tokens is None:
                raise ValueError(
                    f"{where}: response_num_tokens is missing and row {index} is length-controlled "
                    f"(num_tokens={num_tokens}); pass --tokenizer DIR to count tokens or --no-length"
                )
            used = count_tokens(record["response"]) if isinstance(record["response"], str) else 0
        rows.append(reward_row(spec, record["response"], used, num_tokens=num_tokens, index=index))
    if not any_row_field and len(rows) != len(specs):
        raise ValueError(
            f"{responses_path} has {len(rows)} responses for {len(specs)} rows of {parquet_path}; "
            "give each line a \"row\" field to score several responses per row"
        )
    return rows


def oracle_rows(parquet_path: str | Path, *, use_length: bool = True) -> list[dict[str, object]]:
    """One response per row: the row's own ground truth in the <think></think><answer></answer>
    format, exactly on its length budget. Scoring them shows the most the reward can give."""
    rows = []
    for index, spec in enumerate(read_rows(parquet_path)[0]):
        num_tokens = spec.num_tokens if use_length else NO_LENGTH_CONTROL
        response = f"<think></think><answer>{spec.ground_truth}</answer>"
        rows.append(reward_row(spec, response, abs(num_tokens), num_tokens=num_tokens, index=index))
    return rows


def reward_row(spec: PromptRow, response: object, used: int | None, *, num_tokens: int | None = None,
               index: int | None = None) -> dict[str, object]:
    """A ``score_batch`` row: a parquet row's reward fields with one response of ``used`` tokens.
    ``num_tokens`` overrides the row's length instruction; ``index`` is kept as ``"row"`` when given."""
    row = {
        "data_source": spec.data_source, "response": response, "ground_truth": spec.ground_truth,
        "lower_limit": spec.lower_limit, "upper_limit": spec.upper_limit,
        "num_tokens": spec.num_tokens if num_tokens is None else num_tokens, "response_num_tokens": used,
    }  # fmt: skip
    return row if index is None else {"row": index, **row}


def _jsonl(path: str | Path) -> Iterable[tuple[int, dict]]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {line_number} is not valid JSON: {err}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {line_number} must be a JSON object, got {type(record).__name__}")
            yield line_number, record


def summarize(rows: Sequence[Mapping[str, object]], results: Sequence[RewardResult]) -> dict[str, dict[str, float]]:
    """Per data_source (and 'all'): responses, accuracy (mean valid), mean reward and its parts,
    and the fraction well formatted."""
    groups: dict[str, list[RewardResult]] = defaultdict(list)
    for row, result in zip(rows, results, strict=True):
        groups[str(row["data_source"])].append(result)
    groups = dict(sorted(groups.items()))
    if len(groups) > 1:
        groups["all"] = list(results)
    return {source: _stats(group) for source, group in groups.items()}


def _stats(results: Sequence[RewardResult]) -> dict[str, float]:
    count = len(results)
    return {
        "responses": count,
        "accuracy": sum(r.valid for r in results) / count,
        "reward": sum(r.total for r in results) / count,
        "format": sum(r.format for r in results) / count,
        "correctness": sum(r.correctness for r in results) / count,
        "length": sum(r.length for r in results) / count,
        "well_formatted": sum(r.format > 0 for r in results) / count,
    }


def format_summary(summary: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width table of ``summarize``'s output."""
    header = f"{'data_source':<26} {'task':<15} {'n':>6} {'accuracy':>9} {'reward':>8} {'format':>7} {'length':>7}"
    lines = [header, "-" * len(header)]
    for source, stats in summary.items():
        task = "" if source == "all" else task_of(source)
        lines.append(
            f"{source:<26} {task:<15} {stats['responses']:>6} {stats['accuracy']:>9.3f} "
            f"{stats['reward']:>8.3f} {stats['format']:>7.3f} {stats['length']:>7.3f}"
        )
    return "\n".join(lines)


def write_results(path: str | Path, rows: Sequence[Mapping[str, object]], results: Sequence[RewardResult]) -> None:
    """One JSON object per response: its row, data_source and every part of its reward."""
    with open(path, "w", encoding="utf-8") as handle:
        for row, result in zip(rows, results, strict=True):
            record = {"row": row.get("row"), "data_source": row["data_source"], **result._asdict()}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

