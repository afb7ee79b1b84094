"""Megatron distributed checkpoints (``torch_dist`` backend) written and read from one process, by key.

A Megatron distributed checkpoint is a ``torch.distributed.checkpoint`` (DCP) directory (``.metadata``
+ ``*.distcp`` files) plus Megatron's ``metadata.json`` (which backend) and ``common.pt`` (the
non-tensor state, e.g. ``iteration``). Megatron saves one from every rank of a running model; the
converter instead writes the same keys, global shapes and chunks (:mod:`megatron_rl.checkpoint.layout`)
from one process, computing each chunk only when the DCP writer asks for it (a save planner whose
``resolve_data`` builds the chunk from the HF file), so memory holds one chunk at a time. Reading
asks DCP for one key's slice (one layer) at a time; DCP assembles it from whatever TP chunks the
checkpoint was saved with.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_rl.checkpoint.hf_io import release_freed_memory

__all__ = ["CheckpointReader", "LazyTensor", "write_dist_checkpoint"]

METADATA_JSON = "metadata.json"  # Megatron's CheckpointingConfig
COMMON_FILE = "common.pt"
# Megatron's CheckpointingConfig for the torch_dist backend (what dist_checkpointing.save writes).
_BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}


@contextlib.contextmanager
def _single_process():
    """DCP warns on every call without a process group that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class LazyTensor:
    """One chunk to write: where it sits in its global tensor, and how to compute it when written."""

    def __init__(self, key: str, global_shape: Sequence[int], offsets: Sequence[int], sizes: Sequence[int],
                 dtype: torch.dtype, compute: Callable[[], torch.Tensor]) -> None:
        self.key, self.compute, self.dtype = key, compute, dtype
        self.global_shape, self.offsets, self.sizes = torch.Size(global_shape), torch.Size(offsets), torch.Size(sizes)

    def write_item(self) -> WriteItem:
        chunk = ChunkStorageMetadata(offsets=self.offsets, sizes=self.sizes)
        return WriteItem(index=MetadataIndex(self.key, self.offsets), type=WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=self.dtype),
                                                     size=self.global_shape))


class _LazySavePlanner(DefaultSavePlanner):
    """Plans the given chunks and objects and computes each chunk only when the writer resolves it."""

    def __init__(self, tensors: list[LazyTensor], objects: dict[str, bytes]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = {(t.key, t.offsets): t for t in tensors}
        self._items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects]
        self._items += [t.write_item() for t in tensors]
        self._objects = objects
        self._previous: torch.Tensor | None = None
        self._previous_index: MetadataIndex | None = None

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(items=self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        index = write_item.index
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[index.fqn])
        # The serial writer (see write_dist_checkpoint) has written the previous chunk by now, but keeps a
        # reference to the last chunk of every key until the file is complete: release its memory (chunks
        # that are views of a safetensors read buffer cannot be released; they are one layer's slices).
        if self._previous is not None and self._previous.untyped_storage().resizable():
            self._previous.untyped_storage().resize_(0)
        if index.offset[0] != getattr(self._previous_index, "offset", (None,))[0]:
            release_freed_memory()  # about once per layer
        self._previous_index = index
        lazy = self._tensors[(index.fqn, index.offset)]
        data = lazy.compute()
        if tuple(data.shape) != tuple(lazy.sizes) or data.dtype != lazy.dtype:
            raise AssertionError(f"{lazy.key} at {tuple(lazy.offsets)}: computed {tuple(data.shape)} {data.dtype}, "
                                 f"planned {tuple(lazy.sizes)} {lazy.dtype}")
        self._previous = data = data.contiguous()
        return data


def write_dist_checkpoint(ckpt_dir: Path, tensors: list[LazyTensor], objects: dict[str, Any],
                          common: dict[str, Any]) -> None:
    """Write a Megatron distributed checkpoint into the existing directory ``ckpt_dir`` from one process.

    Args:
        tensors: every chunk of every tensor (DCP checks that each tensor's chunks tile it exactly).
        objects: Megatron ShardedObjects by unique key (``{key}/shard_{offset}_{shape}``); stored like
            Megatron does, as ``torch.save([value])``.
        common: the non-tensor state (``common.pt``), e.g. ``{"iteration": 0}``.
    """
    blobs = {}
    for key, value in objects.items():
        buffer = io.BytesIO()
        torch.save([value], buffer)
        blobs[key] = buffer.getvalue()
    # One thread, no copy-ahead: chunks are computed one at a time, in order, each after the previous is
    # written (the overlapping loader that DCP uses with CUDA would compute several ahead).
    writer = dcp.FileSystemWriter(str(ckpt_dir), single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
    with _single_process():
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(tensors, blobs), no_dist=True)
    torch.save(common, ckpt_dir / COMMON_FILE)
    (ckpt_dir / METADATA_JSON).write_text(json.dumps(_BACKEND_CONFIG))


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Reads the box (offsets, destination's shape) of each requested key into its destination tensor."""

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._requests = requests

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self._requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self._requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor returned a view of the destination: the data is already in place


class _CachedMetadataReader(dcp.FileSystemReader):
    """Reads ``.metadata`` once (every :meth:`CheckpointReader.read` is a DCP load of its own)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class CheckpointReader:
    """The tensors of a Megatron distributed checkpoint, read by key (and layer) from one process.

    Raises (at construction):
        FileNotFoundError: ``ckpt_dir`` or its ``metadata.json`` / ``.metadata`` is missing.
        ValueError: the checkpoint is not a ``torch_dist`` one.
    """

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.dir} does not exist")
        config_file = self.dir / METADATA_JSON
        if not config_file.is_file() or not (self.dir / ".metadata").is_file():
            raise FileNotFoundError(f"{self.dir} is not a Megatron distributed checkpoint: "
                                    f"{METADATA_JSON} or .metadata is missing")
        backend = json.loads(config_file.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{config_file}: sharded_backend={backend!r}; only 'torch_dist' is supported")
        self._reader = _CachedMetadataReader(str(self.dir))
        self.metadata = self._reader.read_metadata()

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> global shape of every tensor in the checkpoint (model, optimizer, ...)."""
        return {key: tuple(md.size) for key, md in self.metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata)}

    def object_keys(self) -> list[str]:
        return [key for key, md in self.metadata.state_dict_metadata.items()
                if not isinstance(md, TensorStorageMetadata)]

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, key: str, layer: int | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key``: whole, or its slice ``[layer]`` of a layer-stacked one, or rows [start, stop) of
        an unstacked one (only the chunks holding them are read)."""
        shape = self.tensor_shapes()[key]
        offsets, sizes = [0] * len(shape), list(shape)
        if layer is not None:
            offsets[0], sizes[0] = layer, 1
        elif rows is not None:
            offsets[0], sizes[0] = rows[0], rows[1] - rows[0]
        dest = torch.empty(sizes, dtype=self.dtype(key))
        with _single_process():
            dcp.load({key: dest}, storage_reader=self._reader,
                     planner=_SliceLoadPlanner({key: (tuple(offsets), dest)}), no_dist=True)
        return dest if layer is None else dest[0]

    def common(self) -> dict[str, Any]:
        """The non-tensor state (``common.pt``; plain Python values only)."""
        path = self.dir / COMMON_FILE
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
