"""Launching `megatron-rl train` runs from tests (subprocesses: vLLM and torch.distributed own the process)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"

# The quickstart shrunk to seconds per step: 4 prompts x 4 samples, 16-token responses. Two SFT steps
# do not teach the format, so every reward is the same and the advantages are 0: the entropy bonus
# keeps the updates (and so the resume checks) non-trivial.
FAST = (
    "data.batch_size=4", "rollout.n=4", "rollout.max_response_length=16", "data.builtin_num_train=64",
    "data.builtin_num_test=8", "trainer.sft_warmup_steps=2", "algorithm.micro_batch_size=8",
    "algorithm.entropy_coef=0.01",
    "rollout.kv_cache_gib=0.25", "trainer.test_freq=0", "trainer.progress_bar=false",
)
def is_timing(key: str) -> bool:
    """Metrics that measure wall time (time/*, sync/seconds, sync/load_seconds): the only ones allowed
    to differ between identical runs."""
    return key.startswith("time/") or key.endswith("seconds")


def train_command(out: Path, *overrides: str, nproc: int = 1, config: Path = QUICKSTART) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [*launcher, "-m", "megatron_rl.cli", "train", str(config), f"trainer.output_dir={out}", *overrides]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_train(out: Path, *overrides: str, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run to completion; fail with the output tail if the run fails."""
    proc = subprocess.run(train_command(out, *overrides, nproc=nproc), check=False, cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def comparable(records: Sequence[dict]) -> list[dict]:
    """Metrics records without the wall-time keys."""
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


def hf_weights(out: Path) -> dict:
    return load_file(str(out / "hf" / "model.safetensors"))
