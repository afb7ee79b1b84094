"""Shared fixtures: the real Med-U1 files beside the checkout, and the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEDU1_DIR = Path(os.environ.get("MEGATRON_RL_MEDU1_DIR", REPO.parent / "shared" / "data" / "medu1"))
MEDU1_FILES = ("mediq", "medxpertqa", "medcalc", "huatuo")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def medu1_dir() -> Path:
    """../shared/data/medu1 (third-party data, never in the repo); skip where a clone lacks it."""
    if not all((MEDU1_DIR / f"{name}.parquet").is_file() for name in MEDU1_FILES):
        pytest.skip(f"Med-U1 data not found at {MEDU1_DIR} (set MEGATRON_RL_MEDU1_DIR to its folder)")
    return MEDU1_DIR
