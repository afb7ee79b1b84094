"""Fixtures of the evaluation tests: the tiny model (tokenizer and weights) and a helper path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from megatron_rl.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("eval_tiny"))
