"""Fixtures of the fault tests: a session-wide tally that the fuzz tests fill and pytest prints at the end."""

from __future__ import annotations

from collections import Counter

import pytest

_TALLY_KEY = pytest.StashKey[Counter]()


@pytest.fixture(scope="session")
def fuzz_tally(pytestconfig: pytest.Config) -> Counter:
    """Counts (rows, responses, ...) and maxima that the fuzz tests record, printed in the summary."""
    return pytestconfig.stash.setdefault(_TALLY_KEY, Counter())


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    tally = config.stash.get(_TALLY_KEY, None)
    if tally:
        terminalreporter.section("fuzz counts")
        for key, value in sorted(tally.items()):
            terminalreporter.write_line(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
