"""HF model directory <-> Megatron checkpoint directory, streaming tensor by tensor, loud on any mismatch.

A **Megatron checkpoint directory** (what ``hf_to_megatron`` writes and the trainer saves) is::

    CKPT_DIR/
      metadata.json  .metadata  *.distcp  common.pt   a Megatron distributed checkpoint (torch_dist):
                                                      the model (+ optimizer, + RNG state when saved by
                                                      training), keys and shapes as GPTModel's
                                                      sharded_state_dict (see checkpoint/layout.py);
                                                      loadable at any TP/PP with load_checkpoint
      config.json                                     the HF config of the model (architecture, vocab,
                                                      tie_word_embeddings): the model's shape
      generation_config.json, tokenizer files         copied from the HF model, when it has them

``common.pt`` holds ``iteration`` and ``megatron_rl`` (format version, whether optimizer and RNG state
are present, the TP/PP it was saved at). The stored model does not depend on TP/PP except that the
embedding (and untied output layer) has ``padded_vocab_size(vocab, divisor, tp)`` rows, zero beyond
the HF vocabulary; loading at another TP pads or cuts those rows.

``megatron_to_hf`` writes an HF directory: ``model.safetensors`` (or ``model-0000i-of-0000n``
shards + ``model.safetensors.index.json`` above ``max_shard_bytes``), ``config.json``,
``generation_config.json`` and the tokenizer files. Every output directory is built beside its target
and renamed into place, so a failure (bad input, failed ``verify``) leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_rl.checkpoint.distributed import FORMAT_KEY, FORMAT_VERSION
from megatron_rl.checkpoint.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsSource,
    atomic_dir,
    load_hf_config,
    release_freed_memory,
    write_model_metadata,
    write_shards,
)
from megatron_rl.checkpoint.layout import (
    ModelTensor,
    describe_config,
    extra_state_keys,
    hf_tensor_shapes,
    model_tensors,
)
from megatron_rl.checkpoint.megatron_io import CheckpointReader, LazyTensor, write_dist_checkpoint
from megatron_rl.checkpoint.qwen2 import EMBEDDING, OUTPUT_LAYER, _check_tp, _stage_layers
from megatron_rl.megatron.model import GPTShape, padded_vocab_size

__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "ConversionResult", "compare_logits", "hf_to_megatron",
           "megatron_to_hf", "one_process_world", "write_hf_checkpoint"]

# Top-level key prefixes of the model's tensors in a distributed checkpoint (others: optimizer, RNG).
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
# fp32 logits of the same weights computed by Megatron and transformers differ by op order only.
VERIFY_ATOL = 1e-3

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote."""

    out_dir: Path
    num_tensors: int  # HF tensors converted
    num_bytes: int  # tensor bytes written
    max_logit_diff: float | None = None  # with verify=True


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, *,
                   dtype: str | torch.dtype | None = None, make_vocab_size_divisible_by: int = 128,
                   verify: bool = False, atol: float = VERIFY_ATOL) -> ConversionResult:
    """Convert an HF model directory into a Megatron checkpoint directory laid out for TP=``tp``, PP=``pp``.

    Tensors are read one chunk at a time (only the rows / columns of that TP shard and layer) and written
    as they are read. ``verify`` compares Megatron's logits (TP=1, this process, CPU) with transformers'.

    Args:
        dtype: "fp32" / "bf16" / "fp16" (or a torch dtype) to cast to; None keeps the checkpoint's dtype
            (which must then be the same for every tensor).

    Raises:
        FileExistsError: ``out_dir`` exists.
        FileNotFoundError / ValueError: a missing shard, a corrupted file, or a config that the tensors
            contradict (the message names the tensor or file and both values).
        KeyError: a tensor the map does not know, or one it needs that is absent.
    """
    config = load_hf_config(hf_dir)
    shape = GPTShape.from_hf(config)
    _check_layout(shape, tp, pp)
    source = SafetensorsSource(hf_dir)
    out_dtype = _check_hf_tensors(source, shape, config, _as_dtype(dtype))
    padded = padded_vocab_size(shape.vocab_size, make_vocab_size_divisible_by, tp)
    chunks = [_lazy_chunk(t, shape, chunk, tp, source, out_dtype)
              for t in model_tensors(shape, padded) for chunk in t.chunks(shape, tp)]
    common = {"iteration": 0, FORMAT_KEY: {"version": FORMAT_VERSION, "has_optimizer": False, "has_rng_state": False,
                                           "tp": tp, "pp": pp, "make_vocab_size_divisible_by": make_vocab_size_divisible_by}}
    with atomic_dir(out_dir) as tmp:
        write_dist_checkpoint(tmp, chunks, dict.fromkeys(extra_state_keys(shape)), common)
        write_model_metadata(tmp, hf_dir)
        diff = compare_logits(hf_dir, tmp, atol=atol, divisor=make_vocab_size_divisible_by) if verify else None
    num_bytes = sum(c.sizes.numel() * c.dtype.itemsize for c in chunks)
    return ConversionResult(Path(out_dir), len(hf_tensor_shapes(shape)), num_bytes, diff)


def _lazy_chunk(t: ModelTensor, shape: GPTShape, chunk, tp: int, source: SafetensorsSource,
                dtype: torch.dtype) -> LazyTensor:
    return LazyTensor(t.key, t.global_shape, chunk.offsets, chunk.sizes, dtype,
                      lambda: t.chunk_data(shape, chunk, tp, source).to(dtype))


def _check_layout(shape: GPTShape, tp: int, pp: int) -> None:
    for name, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    _check_tp(shape, 0, tp)
    _stage_layers(shape, 0, pp)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_hf_tensors(source: SafetensorsSource, shape: GPTShape, config: Any, dtype: torch.dtype | None) -> torch.dtype:
    """Every HF tensor is expected with the config's shape, and every expected one is there; return the
    output dtype."""
    expected = hf_tensor_shapes(shape)
    names = set(source.names())
    if shape.tied_embeddings and OUTPUT_LAYER[1] in names:
        _check_tied_copy(source)
        names.discard(OUTPUT_LAYER[1])
    missing, unknown = sorted(set(expected) - names), sorted(names - set(expected))
    if missing or unknown:
        raise KeyError(f"{source.dir}: tensors missing for the config: {missing or 'none'}; tensors the "
                       f"{shape.model_type} map does not know: {unknown or 'none'} (config: {describe_config(config)})")
    for name, dims in expected.items():
        if source.shapes[name] != dims:
            raise ValueError(f"{name}: shape {source.shapes[name]} in {source.file_of[name]}, but config.json gives "
                             f"{dims} ({describe_config(config)})")
    if dtype is not None:
        return dtype
    dtypes = {source.dtype(n) for n in expected}
    if len(dtypes) > 1:
        raise ValueError(f"{source.dir}: tensors have several dtypes {sorted(map(str, dtypes))}; choose one with dtype")
    return dtypes.pop()


def _check_tied_copy(source: SafetensorsSource) -> None:
    """A tied checkpoint may store lm_head as a copy of the embedding; anything else would be lost."""
    if source.shapes[OUTPUT_LAYER[1]] != source.shapes[EMBEDDING[1]] or not torch.equal(
            source.read(OUTPUT_LAYER[1]), source.read(EMBEDDING[1])):
        raise ValueError(f"{OUTPUT_LAYER[1]} differs from {EMBEDDING[1]} but config.json has "
                         "tie_word_embeddings=True: the output layer would be lost")


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, hf_config_from: str | Path | None = None,
                   tokenizer_dir: str | Path | None = None, dtype: str | torch.dtype | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, verify: bool = False,
                   atol: float = VERIFY_ATOL) -> ConversionResult:
    """Convert a Megatron checkpoint directory (converted or saved by training, any TP/PP) into an HF
    model directory loadable by ``AutoModelForCausalLM.from_pretrained`` and vLLM.

    Args:
        hf_config_from: an HF directory whose config.json describes the model (default: ``ckpt_dir``).
        tokenizer_dir: where the tokenizer / generation config files come from (default: ``ckpt_dir`` if
            it has tokenizer files, else ``hf_config_from``).
        dtype: cast every tensor ("fp32" / "bf16" / "fp16"); None keeps the checkpoint's dtypes.

    Raises:
        FileExistsError: ``out_dir`` exists.
        FileNotFoundError: not a checkpoint, or no config.json.
        KeyError / ValueError: a model tensor is missing, unknown, or shaped unlike the config (naming it
            and both values).
    """
    reader = CheckpointReader(ckpt_dir)
    config_dir = Path(hf_config_from) if hf_config_from is not None else Path(ckpt_dir)
    if not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"{config_dir} has no config.json; pass the HF model with --hf-config-from")
    config = load_hf_config(config_dir)
    shape = GPTShape.from_hf(config)
    tensors = _check_checkpoint(reader, shape, config)
    if tokenizer_dir is None:
        tokenizer_dir = ckpt_dir if (Path(ckpt_dir) / "tokenizer_config.json").is_file() else config_dir
    named = _hf_tensors(reader, shape, tensors, _as_dtype(dtype))
    with atomic_dir(out_dir) as tmp:
        num_bytes = _write_hf_dir(tmp, named, shape, config, config_dir, tokenizer_dir, max_shard_bytes)
        diff = compare_logits(tmp, ckpt_dir, atol=atol) if verify else None
    return ConversionResult(Path(out_dir), len(hf_tensor_shapes(shape)), num_bytes, diff)


def _check_checkpoint(reader: CheckpointReader, shape: GPTShape, config: Any) -> list[ModelTensor]:
    """The model tensors of the checkpoint, checked against the config (names, shapes, zero padding)."""
    shapes = reader.tensor_shapes()
    found = {k for k in shapes if k.startswith(MODEL_KEY_PREFIXES)}
    embedding_rows = shapes.get(EMBEDDING[0], (0,))[0]
    tensors = model_tensors(shape, embedding_rows)
    expected = {t.key: t for t in tensors}
    missing, unknown = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or unknown:
        hint = ""
        if OUTPUT_LAYER[0] in missing + unknown:
            hint = f"; config.json has tie_word_embeddings={shape.tied_embeddings}"
        raise KeyError(f"{reader.dir}: model tensors missing for the config: {missing or 'none'}; tensors the config "
                       f"does not have: {unknown or 'none'}{hint} ({describe_config(config)})")
    for key, t in expected.items():
        if shapes[key] != t.global_shape:
            raise ValueError(f"{key}: shape {shapes[key]} in the checkpoint, but config.json gives {t.global_shape} "
                             f"({describe_config(config)})")
    if embedding_rows < shape.vocab_size:
        raise ValueError(f"{EMBEDDING[0]}: {embedding_rows} rows in the checkpoint, fewer than config.json's "
                         f"vocab_size={shape.vocab_size}")
    return tensors


def _hf_tensors(reader: CheckpointReader, shape: GPTShape, tensors: list[ModelTensor],
                dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in HF order, read one key (one layer) at a time."""
    layered = [t for t in tensors if t.num_layers is not None]
    for t in tensors:
        if t.num_layers is not None:
            if t is layered[0]:
                for layer in range(shape.num_layers):
                    for lt in layered:
                        yield from _converted(lt, shape, reader.read(lt.key, layer), dtype, layer)
                    release_freed_memory()
            continue
        if t.is_vocab:  # the HF rows, then the padding rows apart (to check them without a copy of all)
            _check_zero_padding(t.key, reader.read(t.key, rows=(shape.vocab_size, t.global_shape[0])),
                                shape.vocab_size)
            full = reader.read(t.key, rows=(0, shape.vocab_size))
            yield t.names_of(None)[0], full if dtype is None else full.to(dtype)
        else:
            yield from _converted(t, shape, reader.read(t.key), dtype, None)


def _converted(t: ModelTensor, shape: GPTShape, full: torch.Tensor, dtype: torch.dtype | None,
               layer: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in zip(t.names_of(layer), t.to_hf(shape, full), strict=True):
        yield name, tensor if dtype is None else tensor.to(dtype)


def _check_zero_padding(key: str, padding: torch.Tensor, vocab_size: int) -> None:
    """Padded vocabulary rows (``padding``, from row ``vocab_size`` on) are written as zeros and stay zero in
    training (no token and no logprob reaches them); a non-zero one means config.json's vocab_size is
    smaller than the model's."""
    if padding.numel() and padding.abs().max().item() != 0:
        row = vocab_size + int(padding.abs().amax(dim=1).nonzero()[0])
        raise ValueError(f"{key}: row {row} beyond config.json's vocab_size={vocab_size} is not zero: the config's "
                         "vocab_size is smaller than the checkpoint's vocabulary")


def write_hf_checkpoint(out_dir: str | Path, named_tensors: Iterable[tuple[str, torch.Tensor]], hf_config: Any, *,
                        tokenizer_dir: str | Path | None = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ConversionResult:
    """Write full HF-named tensors (e.g. from weight sync at the end of training) as an HF model directory,
    atomically, holding at most one output shard in memory.

    Args:
        named_tensors: (HF name, full tensor) pairs, each name once (no ``lm_head.weight`` when tied).
        hf_config: a ``PretrainedConfig`` or an HF model directory (its config.json is copied).
        tokenizer_dir: tokenizer and generation-config files to copy (default: ``hf_config`` if a directory).

    Raises:
        KeyError / ValueError: an unknown, repeated or missing name, or a shape unlike the config's.
    """
    config = load_hf_config(hf_config)
    shape = GPTShape.from_hf(config)
    if tokenizer_dir is None and isinstance(hf_config, (str, os.PathLike)):
        tokenizer_dir = hf_config
    with atomic_dir(out_dir) as tmp:
        num_bytes = _write_hf_dir(tmp, named_tensors, shape, config, hf_config, tokenizer_dir, max_shard_bytes)
    return ConversionResult(Path(out_dir), len(hf_tensor_shapes(shape)), num_bytes)


def _write_hf_dir(out_dir: Path, named_tensors: Iterable[tuple[str, torch.Tensor]], shape: GPTShape, config: Any,
                  config_source: Any, tokenizer_dir: str | Path | None, max_shard_bytes: int) -> int:
    expected = hf_tensor_shapes(shape)
    seen: set[str] = set()
    num_bytes = 0

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal num_bytes
        for name, tensor in named_tensors:
            if name not in expected:
                raise KeyError(f"{name} is not a tensor of this model ({describe_config(config)})")
            if name in seen:
                raise KeyError(f"{name} was given twice")
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, but config gives {expected[name]} "
                                 f"({describe_config(config)})")
            seen.add(name)
            num_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor

    write_shards(out_dir, checked(), max_shard_bytes)
    missing = sorted(set(expected) - seen)
    if missing:
        raise KeyError(f"tensors missing from the export: {missing}")
    write_model_metadata(out_dir, config_source, tokenizer_dir)
    return num_bytes


def compare_logits(hf_dir: str | Path, ckpt_dir: str | Path, *, atol: float = VERIFY_ATOL,
                   divisor: int = 128) -> float:
    """Max |logit difference| between transformers (fp32) on ``hf_dir`` and a Megatron model (TP=1, fp32,
    this process) loaded from ``ckpt_dir``, on a fixed input of 2 x 16 tokens; raise above ``atol``.

    Starts a one-process gloo world if torch.distributed is not initialised (and tears it down after).

    Raises:
        ValueError: the difference exceeds ``atol``.
    """
    from transformers import AutoModelForCausalLM

    from megatron_rl.checkpoint.distributed import load_checkpoint

    config = load_hf_config(hf_dir)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, trust_remote_code=False)
    with torch.no_grad():
        hf_logits = hf_model(ids).logits
    del hf_model
    with one_process_world():
        from megatron_rl.megatron.model import build_gpt_model

        model = build_gpt_model(config, make_vocab_size_divisible_by=divisor)
        load_checkpoint(ckpt_dir, model, None, load_rng=False)
        model.eval()
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[..., : config.vocab_size]
    diff = (logits - hf_logits).abs().max().item()
    if not diff <= atol:
        raise ValueError(f"verify failed: max |logit diff| between Megatron and transformers is {diff:.3g} > {atol:g}")
    return diff


class one_process_world:
    """Megatron TP=1/PP=1 in this process: a one-rank gloo world unless one exists already."""

    def __enter__(self) -> None:
        import torch.distributed as dist

        from megatron_rl.megatron.parallel import init_parallel, local_world_env

        self.created = not dist.is_initialized()
        if self.created:
            env = local_world_env()
            self.saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
        elif dist.get_world_size() != 1:
            raise ValueError("verify runs in one process; torch.distributed has several ranks here")
        init_parallel(tp=1, pp=1)

    def __exit__(self, *exc: object) -> None:
        if self.created:
            from megatron_rl.megatron.parallel import destroy_parallel

            destroy_parallel()
            for key, value in self.saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
