"""GRPO with the real model: two steps on real Med-U1 rows (full prompts) whose peak RSS stays within the
memory plan; the setting that the kernel killed (micro-batch 16) refused up front by the plan; the
trainer-vs-engine logprob gap measured (non-zero, below 1e-4) with a colocated and a separate engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _realmodel import REAL_MODEL

from megatron_rl.config import load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
GAP_MAX = 1e-4
"""Trainer vs engine logprobs of the sampled tokens, same weights, both fp32 (measured ~1e-5)."""

RUN = ["data.max_prompt_length=768", "data.val_files=[]", "rollout.kv_cache_gib=0.25", "trainer.test_freq=0",
       "trainer.sft_warmup_steps=0", "trainer.export_hf=false", "trainer.progress_bar=false"]
SMALL = ["data.batch_size=2", "rollout.n=2", "rollout.max_response_length=16", "algorithm.micro_batch_size=1"]
"""Two MedIQ prompts (243-728 tokens, all kept whole by max_prompt_length=768) x two 16-token responses,
one sequence per micro-batch (the plan: ~6 GiB on this host)."""
KILLED = ["data.batch_size=4", "rollout.n=4", "rollout.max_response_length=256", "algorithm.micro_batch_size=16"]
"""The setting the kernel killed at 24 GB RSS: all 16 sequences of ~1,000 tokens in one micro-batch."""
HOST_GIB = 24
"""The RAM of the machine the run was killed on (and of CI's)."""


def _overrides(medu1_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={REAL_MODEL}", 'data.builtin_tasks=""', f"data.train_files=[{medu1_dir / 'mediq.parquet'}]",
            *RUN, f"trainer.output_dir={out}", *extra]


def _train(overrides: list[str], timeout_s: float = 1500) -> tuple[int, str, int]:
    """``megatron-rl train`` in a process of its own: (exit code, output, peak RSS in bytes of that process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "train", str(QUICKSTART), *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    peak = [0]
    watcher = threading.Thread(target=_watch_peak_rss, args=(proc, peak), daemon=True)
    watcher.start()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    watcher.join()
    reader.join()
    return proc.returncode, "".join(output), peak[0]


def _watch_peak_rss(proc: subprocess.Popen, peak: list[int]) -> None:
    """The child's peak RSS: VmHWM of /proc/PID/status, the high-water mark of the child's own address
    space, read until it exits (a high-water mark: any read after the peak shows it). Not the ``ru_maxrss``
    of wait4: Linux carries the forking parent's high-water mark into it across exec, and this pytest
    process may be larger than the run."""
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass  # exited (a zombie has no VmHWM line) between the poll and the read
        time.sleep(0.05)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _plan(overrides: list[str], host_bytes: int):
    memory = pytest.importorskip("megatron_rl.memory.plan", reason="the memory plan (megatron_rl.memory.plan) "
                                                                   "is not there yet")
    cfg = load_config(QUICKSTART, overrides)
    return memory.plan_run(cfg, memory.hf_config_for(cfg), num_gpus=1, device="cpu", device_bytes=host_bytes)


def _check_gap(records: list[dict]) -> None:
    for record in records:
        gap = record["rollout/logprob_gap_mean"]
        print(f"step {record['step']}: rollout/logprob_gap_mean {gap:.3g}")
        assert 0 < gap < GAP_MAX  # exactly 0 would mean the metric measured nothing


def test_two_grpo_steps_on_real_rows_stay_within_the_memory_plan(real_model_dir, medu1_dir: Path,
                                                                  tmp_path: Path) -> None:
    """Every sync is checked against the engine's weights (rollout.check_weights); the run's peak RSS is at
    most the plan's prediction for this host. The model does not write the answer format in 16 tokens, so
    every reward is the same and every advantage 0: the entropy bonus keeps the weights moving."""
    out = tmp_path / "run"
    overrides = _overrides(medu1_dir, out, *SMALL, "trainer.total_steps=2", "rollout.check_weights=true",
                           "algorithm.entropy_coef=0.01")
    start = time.perf_counter()
    code, output, peak_rss = _train(overrides)
    assert code == 0, output[-5000:]
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    _check_gap(records)  # colocated engine
    assert all(r["response_length/mean"] > 0 and r["actor/grad_norm"] > 0 for r in records)
    plan = _plan(overrides, HOST_GIB << 30)
    print(f"2 steps in {time.perf_counter() - start:.0f} s; peak RSS {peak_rss / 2**30:.2f} GiB, plan "
          f"{plan.peak_bytes / 2**30:.2f} GiB ({plan.peak_phase})")
    assert plan.fits
    assert peak_rss <= plan.peak_bytes


def test_the_setting_the_kernel_killed_is_refused_up_front(real_model_dir, medu1_dir: Path, tmp_path: Path) -> None:
    """Micro-batch 16 of 16 MedIQ sequences: the plan needs far more than the 24 GB host, so the run stops
    before building a model, with the plan's message (no kernel kill, no half-made run directory)."""
    overrides = _overrides(medu1_dir, tmp_path / "run", *KILLED, "trainer.total_steps=1",
                           f"memory.device_memory_gib={HOST_GIB}")
    plan = _plan(overrides, HOST_GIB << 30)
    assert not plan.fits and plan.peak_phase == "update"
    start = time.perf_counter()
    code, output, peak_rss = _train(overrides)
    print(f"refused in {time.perf_counter() - start:.0f} s, peak RSS {peak_rss / 2**30:.2f} GiB:\n{output[-1500:]}")
    assert code not in (0, -9, 137), output[-3000:]  # refused, not killed
    assert "InsufficientMemoryError" in output and plan.refusal().splitlines()[0] in output
    assert peak_rss < 4 << 30  # no model, no engine was built
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_logprob_gap_with_a_separate_engine(real_model_dir, local_ray, tmp_path: Path) -> None:
    """The trainer in a Ray actor, the vLLM engine in another (rollout.mode=separate); the built-in
    tasks' short prompts: the point is the gap, not the prompt length. With the overlong filter, the
    model's 8-token responses (all or nearly all cut) leave the loss few or no tokens: the gap is still
    measured on every sampled token (it read exactly 0.0 when the filter left none)."""
    from megatron_rl.cluster.launch import launch

    cfg = load_config(QUICKSTART, [f"model.path={REAL_MODEL}", *RUN, *SMALL, "data.builtin_num_train=16",
                                   "data.builtin_num_test=4", "rollout.max_response_length=8", "trainer.total_steps=1",
                                   "algorithm.overlong_filter=true", "rollout.mode=separate",
                                   f"trainer.output_dir={tmp_path / 'run'}"])
    result = launch(cfg)
    records = _metrics(result.run_dir)
    assert [r["step"] for r in records] == [1]
    print(f"responses cut at 8 tokens: {records[0]['response_length/clip_ratio']:.0%}")
    _check_gap(records)
