"""Shared fixtures: the real Med-U1 files beside the checkout, the gpu and registry markers, and one
local Ray per test session (the cluster tests and the real-model separate-engine test share it)."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEDU1_DIR = Path(os.environ.get("MEGATRON_RL_MEDU1_DIR", REPO.parent / "shared" / "data" / "medu1"))
MEDU1_FILES = ("mediq", "medxpertqa", "medcalc", "huatuo")
MEDU1_PRESENT = all((MEDU1_DIR / f"{name}.parquet").is_file() for name in MEDU1_FILES)

# tools/check_install.py, importable as ``check_install`` by the tests (dataclasses look their module up
# in sys.modules); it also answers whether the package registry can be reached.
_spec = importlib.util.spec_from_file_location("check_install", REPO / "tools" / "check_install.py")
check_install = importlib.util.module_from_spec(_spec)
sys.modules["check_install"] = check_install
_spec.loader.exec_module(check_install)


@functools.cache
def registry_unreachable() -> str | None:
    """Why the package registry that pip uses cannot be reached, or None when it can (asked once)."""
    index_url = os.environ.get("PIP_INDEX_URL", check_install.PYPI)
    try:
        check_install.check_reachable(index_url, check_install.ssl_context())
    except check_install.Unreachable as err:
        return str(err)
    return None


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, tests whose requirement is absent: a GPU (marker ``gpu``), the package
    registry (marker ``registry``; probed once, only when such a test is collected) or the third-party
    Med-U1 files (fixture ``medu1_dir``; CI always has them)."""
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
        if item.get_closest_marker("registry") and registry_unreachable() is not None:
            item.add_marker(pytest.mark.skipif(True, reason=registry_unreachable()))


@pytest.fixture(scope="session")
def medu1_dir() -> Path:
    """../shared/data/medu1: third-party data, never in the repo."""
    return MEDU1_DIR


START_ATTEMPTS = 3
"""Ray gives its raylet a fixed 30 s to register at start-up; on a loaded 2-core machine that can pass
("The current node timed out during startup"), so the start is tried again."""


@pytest.fixture(scope="session")
def local_ray():
    ray = pytest.importorskip("ray")
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=4, include_dashboard=False, namespace="megatron-rl-tests", log_to_driver=False)
            break
        except Exception as err:  # Ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS:
                raise
    yield ray
    ray.shutdown()
