"""Fixtures of the fault tests: a session-wide tally that the fuzz tests fill and pytest prints at the
end, and a busy process beside a test (its faults then land under CPU load)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

# One core kept busy for BUSY_SECONDS of every BUSY_PERIOD_SECONDS, at the test's own priority: the run
# beside it competes for the CPU as it does on a shared machine, so phases stretch and shift and the
# kills land at other moments than on an idle machine; the duty cycle keeps the suite's time in check.
BUSY_SECONDS, BUSY_PERIOD_SECONDS = 0.03, 0.1
_BUSY_LOOP = f"""
import time
while True:
    start = time.monotonic()
    while time.monotonic() - start < {BUSY_SECONDS}:
        pass
    time.sleep({BUSY_PERIOD_SECONDS - BUSY_SECONDS})
"""

_TALLY_KEY = pytest.StashKey[Counter]()


@pytest.fixture(scope="session")
def fuzz_tally(pytestconfig: pytest.Config) -> Counter:
    """Counts (rows, responses, ...) and maxima that the fuzz tests record, printed in the summary."""
    return pytestconfig.stash.setdefault(_TALLY_KEY, Counter())


@pytest.fixture
def cpu_load():
    """A busy process beside the test (one core, BUSY_SECONDS of every BUSY_PERIOD_SECONDS), started
    before it and stopped (by its process id) after it."""
    busy = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP])
    try:
        yield busy
    finally:
        busy.kill()
        busy.wait()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    tally = config.stash.get(_TALLY_KEY, None)
    if tally:
        terminalreporter.section("fuzz counts")
        for key, value in sorted(tally.items()):
            terminalreporter.write_line(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
