"""Output paths built from names that come from data or config, kept inside their output folder.

    path = safe_child(output_dir, f"train_{name}.parquet", field="--mix-name")

A name such as ``"../../etc/x"``, ``"/abs/path"`` or ``"a/b"`` would make a run write outside the
folder it was given; these helpers refuse it with an error naming the field and the value.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["check_file_name", "safe_child"]

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_file_name(field: str, value: object) -> str:
    """``value`` if it is a plain file name (letters, digits, ``_ . -``, not starting with a dot or a
    dash): no separator, no ``..``, nothing absolute.

    Raises:
        ValueError: naming ``field`` and ``value`` otherwise.
    """
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{field}={value!r} must be a plain file name (letters, digits, _ . -; no '/' or '..')")
    return value


def safe_child(root: str | Path, name: str, *, field: str) -> Path:
    """``root / name``, checked to stay inside ``root`` once symlinks and ``..`` are resolved.

    Args:
        root: the output folder (need not exist yet).
        name: a relative path below ``root``, usually one file name.
        field: what ``name`` came from, for the error message.

    Raises:
        ValueError: ``name`` is empty, absolute, or leads outside ``root``.
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise ValueError(f"{field}={name!r} must be a relative name inside {str(root)!r}")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path == base or base not in path.parents:
        raise ValueError(f"{field}={name!r} leads outside the folder {str(root)!r}")
    return Path(root) / name
