"""Fixtures of the memory tests: model directories holding only config.json, a one-process gloo world."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "megatron"))

from _measure import SHAPES, write_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """shape name -> a directory holding only that shape's config.json (see _measure.SHAPES)."""
    root = tmp_path_factory.mktemp("memory_models")
    return {shape: write_model(root / shape, shape) for shape in SHAPES}


@pytest.fixture(scope="module")
def world1():
    """A one-process gloo world (TP=PP=DP=1) in this process; torn down afterwards."""
    from _helpers import free_port, set_dist_env

    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    set_dist_env(0, 1, free_port())
    try:
        yield init_parallel(tp=1, pp=1)
    finally:
        destroy_parallel()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
