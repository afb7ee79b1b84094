"""Real models fetched by name (``megatron-rl fetch-model NAME``, ``model.path: NAME``); see docs/models.md."""

from megatron_rl.models.fetch import (
    CACHE_ENV,
    DTYPES,
    ChecksumError,
    FetchError,
    FetchResult,
    RegistryUnavailableError,
    cached_model_dir,
    copy_model,
    default_cache_dir,
    fetch_model,
    resolve_model_path,
)
from megatron_rl.models.registry import KNOWN_MODELS, ModelSource, model_source

__all__ = [
    "CACHE_ENV",
    "DTYPES",
    "KNOWN_MODELS",
    "ChecksumError",
    "FetchError",
    "FetchResult",
    "ModelSource",
    "RegistryUnavailableError",
    "cached_model_dir",
    "copy_model",
    "default_cache_dir",
    "fetch_model",
    "model_source",
    "resolve_model_path",
]
