"""A local Ray for the cluster tests: one per test session, a few logical CPUs on this machine."""

from __future__ import annotations

import pytest

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
