"""bench/gpu_check.py, the one-GPU acceptance run, walked through on the CPU (``--dry-run``) so that it cannot rot
between the sessions that have a GPU: every check runs its control flow with the tiny model, and the table,
the JSON and the exit status say what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

CPU_SKIPS = {"te_vs_local"}
"""What the dry run cannot exercise here: Transformer Engine is a GPU-only package."""


def test_dry_run_walks_every_check_and_writes_the_table(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads((tmp_path / "gpu_check.json").read_text())}
    assert list(rows) == list(gpu_check.CHECK_NAMES)
    for name, row in rows.items():
        expected = {"SKIP"} if name in CPU_SKIPS else {"PASS", "INFO"}
        assert row["status"] in expected, row
        assert row["check"] in result.stdout  # the table names every check
    assert "transformer_engine is not installed" in rows["te_vs_local"]["note"]
    assert rows["trainer_two_steps"]["measured"].startswith("steps [1, 2]")
    assert "storage kept: True" in rows["vllm_push"]["measured"]
    assert (tmp_path / "trainer_run" / "metrics.jsonl").is_file()


def test_a_failing_check_fails_the_run_and_the_others_still_run(tmp_path: Path, monkeypatch) -> None:
    def broken(ctx):
        raise RuntimeError("the device fell over\nsecond line")

    monkeypatch.setitem(gpu_check.CHECKS, "environment", broken)
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "environment", "te_vs_local"])
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1
    assert rows[0]["status"] == "FAIL" and rows[0]["note"].startswith("RuntimeError: the device fell over;")
    assert rows[1]["check"] == "te_vs_local" and rows[1]["status"] == "SKIP"


BARE_IMAGE_BLOCKER = """
import importlib.abc, sys
ABSENT = {absent!r}
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def test_dry_run_on_a_bare_image_needs_only_what_the_bundle_brings(tmp_path: Path) -> None:
    """An air-gapped CUDA image has torch, transformers and safetensors; tools/gpu_bundle.sh adds megatron-core,
    omegaconf and psutil. Here the rest of this venv is hidden (a sitecustomize finder): the model, memory and
    weight-sync checks still run, and what needs the trainer's or vLLM's packages is skipped, naming them."""
    (tmp_path / "site").mkdir()
    absent = sorted({*gpu_check.TRAINER_ONLY_PACKAGES, "vllm"})
    (tmp_path / "site" / "sitecustomize.py").write_text(BARE_IMAGE_BLOCKER.format(absent=absent))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads((tmp_path / "out" / "gpu_check.json").read_text())}
    assert {name for name, row in rows.items() if row["status"] == "PASS"} == {"nccl", "bf16_step", "memory_vs_plan"}
    assert "pyarrow" in rows["trainer_two_steps"]["note"] and rows["trainer_two_steps"]["status"] == "SKIP"
    assert all(rows[name]["status"] == "SKIP" for name in ("sync_7b", "vllm_generate", "vllm_push", "vllm_sleep_wake"))


@pytest.mark.gpu
def test_gpu_check_passes_on_a_gpu(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-5000:]
