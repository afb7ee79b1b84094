"""JSON-lines files that survive a crash: records appended in one write and fsync'ed, whole files
replaced atomically (temporary file in the same folder, fsync, rename). Used by the trainer's
metrics.jsonl and the evaluation's results.jsonl."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["append_records", "rewrite_records"]


def _lines(records: Iterable[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def append_records(path: str | Path, records: Iterable[dict]) -> None:
    """Append ``records`` with one write, then flush and fsync: a kill leaves at most a partial last line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(_lines(records))
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_records(path: str | Path, records: Iterable[dict]) -> None:
    """Replace ``path`` with exactly ``records``, atomically."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(_lines(records))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
