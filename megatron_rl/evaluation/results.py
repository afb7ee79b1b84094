"""``results.jsonl``: one JSON object per sample, appended a prompt at a time, so an interrupted
evaluation resumes where it stopped.

Each prompt's ``n`` lines are written with one ``write``, then flushed and fsync'ed. A process killed
mid-write leaves at most a partial last line and, in principle, a prompt with fewer than ``n`` lines:
:func:`load_completed` keeps only whole prompts and rewrites the file without the rest (atomically)
so the prompt is generated again and never counted twice.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from megatron_rl.jsonl import append_records, rewrite_records

PromptKey = tuple[str, int | None]
"""(prompt id, budget): one generated prompt."""


def prompt_key(record: dict) -> PromptKey:
    return str(record["id"]), record["budget"]


def load_completed(path: Path, n: int) -> dict[PromptKey, list[dict]]:
    """The records of every prompt with all ``n`` samples in ``path`` (empty if it does not exist),
    ordered by sample index. A partial last line and incomplete prompts are dropped from the file.

    Raises:
        ValueError: a line other than the last is not a JSON object (the file was edited or
            corrupted, not interrupted), or a prompt has more than ``n`` samples (results of another
            ``n`` in the same folder); the message names the file and line.
    """
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # A file that ends with "\n" splits into a last empty string; anything else there is a partial line.
    complete_lines, tail = lines[:-1], lines[-1]
    groups: dict[PromptKey, list[dict]] = defaultdict(list)
    for number, line in enumerate(complete_lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err}); only an interrupted last "
                             "line is dropped on resume") from None
        if not isinstance(record, dict) or "id" not in record or "budget" not in record:
            raise ValueError(f"{path}: line {number} is not an evaluation record (needs 'id' and 'budget')")
        groups[prompt_key(record)].append(record)
    completed = {}
    for key, records in groups.items():
        if len(records) > n:
            raise ValueError(f"{path}: prompt {key[0]!r} (budget {key[1]}) has {len(records)} samples, more than "
                             f"n={n}: the folder holds results of another run; use a new --output-dir")
        if len(records) == n:
            completed[key] = sorted(records, key=lambda r: r["sample_index"])
    if tail or len(completed) != len(groups):
        rewrite_records(path, [r for records in completed.values() for r in records])
    return completed


def append_prompt(path: Path, records: list[dict]) -> None:
    """Append one prompt's sample records in one write, then flush and fsync."""
    append_records(path, records)


def write_atomic(path: Path, text: str) -> None:
    """Write a whole text file through a temporary file in the same folder, then rename."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)
