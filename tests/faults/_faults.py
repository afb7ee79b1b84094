"""Running `megatron-rl train` under tests/faults/_chaos.py (an injected fault) from the fault tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trainer"))

from _trainer_runs import FAST, QUICKSTART, REPO, _env, comparable, hf_weights, run_train

__all__ = ["FAST", "REPO", "chaos_command", "comparable", "hf_weights", "run_chaos", "run_train"]


def chaos_command(out: Path, *overrides: str, kill: str | None = None, kill_log: Path | None = None,
                  nan_steps: str = "") -> list[str]:
    fault = ([f"--kill={kill}", f"--log={kill_log}"] if kill else []) + ([f"--nan-steps={nan_steps}"] if nan_steps else [])
    return [sys.executable, str(HERE / "_chaos.py"), *fault, "--", "train", str(QUICKSTART),
            f"trainer.output_dir={out}", *overrides]


def run_chaos(out: Path, *overrides: str, timeout: float = 600, **fault) -> subprocess.CompletedProcess:
    """Run with one injected fault in a new session (a kill takes the whole group); return the result."""
    return subprocess.run(chaos_command(out, *overrides, **fault), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout, start_new_session=True, check=False)
