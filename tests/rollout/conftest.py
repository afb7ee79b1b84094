"""Tiny checkpoints shared by the rollout engine tests (session-scoped: written once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rollout_reference import hf_model

from megatron_rl.testing import tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 checkpoint every engine starts from (seed 0)."""
    return tiny_model(tmp_path_factory.mktemp("tiny_seed0"))


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture with other random weights (seed 1): the 'trained' policy to push."""
    return tiny_model(tmp_path_factory.mktemp("tiny_seed1"), seed=1)


@pytest.fixture(scope="session")
def reference(tiny_dir: Path):
    """The transformers model of ``tiny_dir`` that engines' logprobs are checked against."""
    return hf_model(tiny_dir)
