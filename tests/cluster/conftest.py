"""A local Ray for the cluster tests: one per test session, a few logical CPUs on this machine."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, namespace="megatron-rl-tests", log_to_driver=False)
    yield ray
    ray.shutdown()
