"""Shared fixtures: the real Med-U1 files beside the checkout, and the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEDU1_DIR = Path(os.environ.get("MEGATRON_RL_MEDU1_DIR", REPO.parent / "shared" / "data" / "medu1"))
MEDU1_FILES = ("mediq", "medxpertqa", "medcalc", "huatuo")
MEDU1_PRESENT = all((MEDU1_DIR / f"{name}.parquet").is_file() for name in MEDU1_FILES)


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, tests whose requirement is absent: a GPU (marker ``gpu``) or the
    third-party Med-U1 files (fixture ``medu1_dir``; CI always has them)."""
    no_gpu = pytest.mark.skipif(True, reason="needs a CUDA GPU; none is present")
    no_medu1 = pytest.mark.skipif(
        True, reason=f"Med-U1 data not found at {MEDU1_DIR} (set MEGATRON_RL_MEDU1_DIR to its folder)"
    )
    gpu_present = None
    for item in items:
        if "gpu" in item.keywords:
            gpu_present = _has_gpu() if gpu_present is None else gpu_present
            if not gpu_present:
                item.add_marker(no_gpu)
        if "medu1_dir" in getattr(item, "fixturenames", ()) and not MEDU1_PRESENT:
            item.add_marker(no_medu1)


@pytest.fixture(scope="session")
def medu1_dir() -> Path:
    """../shared/data/medu1: third-party data, never in the repo."""
    return MEDU1_DIR
