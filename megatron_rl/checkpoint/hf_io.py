"""Hugging Face model directories: lazy safetensors reading, streaming sharded writing, metadata files.

Reading opens a file for each read and takes only the rows / columns asked for (``safe_open`` +
``get_slice``), so memory holds the requested piece, not the file. Writing buffers tensors up to
``max_shard_bytes`` and writes one safetensors shard at a time; with more than one shard it adds
``model.safetensors.index.json`` (the layout ``save_pretrained`` produces). Output directories are
built in a temporary directory beside the target and renamed into place (:func:`atomic_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_rl.paths import safe_child

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "HFShardWriter",
    "SafetensorsSource",
    "atomic_dir",
    "load_hf_config",
    "release_freed_memory",
    "remove_stale_temporaries",
    "write_model_metadata",
]

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied verbatim when present: the tokenizer and the generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@functools.cache
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> None:
    """Give memory freed by Python / torch back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Streaming frees a tensor of a few MB after every step; glibc keeps such blocks in its heap (its mmap
    threshold rises to the largest size freed so far), so without this the RSS of a conversion creeps up
    towards the model size although little is alive at any time."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class SafetensorsSource:
    """The tensors of an HF directory (``model.safetensors`` or shards listed in the index), read lazily.

    Raises (at construction):
        FileNotFoundError: no safetensors weights, or a shard named by the index is missing.
        ValueError: a file is not valid safetensors (e.g. truncated), or the index names a tensor that
            its file does not hold; the message names the file.
    """

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        for file_name in files:  # names from the index: never a path outside the model directory
            self._scan(safe_child(self.dir, file_name, field=f"{index} weight_map"))
        if weight_map is not None:
            for name, file_name in weight_map.items():
                if self.file_of.get(name) != self.dir / file_name:
                    raise ValueError(f"{index}: tensor {name!r} is listed in {file_name}, which does not hold it")

    def _scan(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint shard {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    piece = handle.get_slice(name)
                    if name in self.file_of:
                        raise ValueError(f"tensor {name!r} is in both {self.file_of[name]} and {path}")
                    self.file_of[name] = path
                    self.shapes[name] = tuple(piece.get_shape())
                    self._dtypes[name] = _DTYPES[piece.get_dtype()]
        except SafetensorError as err:
            raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupted?): {err}") from None

    def names(self) -> list[str]:
        return list(self.file_of)

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Rows / columns (None: all) of tensor ``name``, copied out of the file."""
        with safe_open(str(self.file_of[name]), framework="pt") as handle:
            piece = handle.get_slice(name)
            if cols is not None:
                return piece[rows or slice(None), cols].contiguous()
            return piece[rows] if rows is not None else piece[:]


class HFShardWriter:
    """Writes (name, tensor) pairs into safetensors shards of at most ``max_shard_bytes`` each (a larger
    tensor gets a shard of its own), then names them like ``save_pretrained`` does."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0")
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"part-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        with open(path, "rb") as handle:  # on disk before the directory is renamed into place
            os.fsync(handle.fileno())
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0
        release_freed_memory()

    def close(self) -> list[str]:
        """Write the last shard, rename the shards and write the index; return the file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.rename(self.out_dir / "part-00000.safetensors", self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        files, weight_map = [], {}
        for i, names in enumerate(self._shards):
            file_name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.rename(self.out_dir / f"part-{i:05d}.safetensors", self.out_dir / file_name)
            files.append(file_name)
            weight_map.update(dict.fromkeys(names, file_name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; rename it to ``out_dir`` when the block
    succeeds, delete it when the block raises (so a failure leaves no ``out_dir``).

    Raises:
        FileExistsError: ``out_dir`` exists already (nothing is overwritten).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; give a new path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(parent: str | Path) -> list[Path]:
    """Delete the temporary directories that :func:`atomic_dir` blocks left in ``parent`` when the
    process was killed inside them (``.NAME.tmp-*``); return them. Call it only while nothing else
    writes into ``parent``."""
    parent = Path(parent)
    stale = sorted(p for p in parent.glob(".*.tmp-*") if p.is_dir()) if parent.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def load_hf_config(config_or_dir: Any) -> Any:
    """An HF ``PretrainedConfig``: given as one, or read from a directory (or its config.json)."""
    if isinstance(config_or_dir, (str, os.PathLike)):
        from transformers import AutoConfig

        path = Path(config_or_dir)
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        return AutoConfig.from_pretrained(str(path.parent if path.is_file() else path), trust_remote_code=False)
    return config_or_dir


def write_model_metadata(out_dir: str | Path, hf_config: Any, tokenizer_dir: str | Path | None = None) -> list[str]:
    """Write the HF side of a model directory next to its weights: ``config.json`` and, from
    ``tokenizer_dir`` (default: ``hf_config`` when that is a directory), the tokenizer files and
    ``generation_config.json`` that exist there. Used by both converters and by the trainer for its
    Megatron checkpoints, so that ``megatron-to-hf`` needs nothing else. Returns the files written.

    Args:
        hf_config: a ``PretrainedConfig``, or an HF model directory (its config.json is copied as is).
    """
    out_dir = Path(out_dir)
    written = ["config.json"]
    source_dir = Path(hf_config) if isinstance(hf_config, (str, os.PathLike)) else None
    if source_dir is not None and source_dir.is_file():
        source_dir = source_dir.parent
    if source_dir is not None:
        if not (source_dir / "config.json").is_file():
            raise FileNotFoundError(f"{source_dir} has no config.json")
        shutil.copyfile(source_dir / "config.json", out_dir / "config.json")
    else:
        hf_config.to_json_file(str(out_dir / "config.json"))
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else source_dir
    if tokenizer_dir is not None:
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out_dir / name)
                written.append(name)
    return written


def write_shards(out_dir: Path, named_tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[str]:
    """Stream ``named_tensors`` into :class:`HFShardWriter` shards in ``out_dir``; return the file names."""
    writer = HFShardWriter(out_dir, max_shard_bytes)
    for name, tensor in named_tensors:
        writer.add(name, tensor)
    return writer.close()
