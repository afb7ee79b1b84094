"""Seconds per step of the quickstart with GRPO against PPO with a critic (GAE, the value model's
forward and update every step), in one run of this script, and the critic's memory by the plan.

    .venv/bin/python bench/ppo_critic.py [--steps 10] [--sft 40] [--keep DIR]
    .venv/bin/python bench/ppo_critic.py --plan examples/medu1_qwen2.5_3b_ppo.yaml --model DIR --gpus 4

Timing: runs `megatron-rl train examples/quickstart.yaml` twice with the same seed, SFT warm-up and
steps: ``algorithm.advantage=grpo`` (the baseline) and ``algorithm.advantage=gae`` (the critic), and
reads each run's metrics.jsonl. Step 1 (engine warm-up) and the last step (its end-of-run save) are
left out. Prints seconds per step and per phase of each, and the ratio PPO / GRPO.

Memory (``--plan``): the memory plan of a recipe with its critic and of the same recipe with GRPO
(``algorithm.advantage=grpo``), for a model directory holding config.json; prints both peaks and the
critic's items (``critic`` and the critic's phases), i.e. what the critic adds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_rl.trainer.metrics import read_metrics

PHASES = ("generate", "score", "logprob", "critic", "update", "sync", "checkpoint")
CASES = {"grpo": ("algorithm.advantage=grpo",), "ppo_critic": ("algorithm.advantage=gae",)}


def _time(args) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            out = Path(args.keep or tmp) / name
            quickstart = str(REPO / "examples" / "quickstart.yaml")
            subprocess.run([sys.executable, "-m", "megatron_rl.cli", "train", quickstart,
                            f"trainer.output_dir={out}", f"trainer.total_steps={args.steps + 1}",
                            f"trainer.sft_warmup_steps={args.sft}", "trainer.export_hf=false",
                            "trainer.progress_bar=false", "trainer.test_freq=0", *overrides],
                           cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            results[name] = [r for r in read_metrics(out / "metrics.jsonl") if 2 <= r["step"] <= args.steps]
    print(f"quickstart step, mean of {args.steps - 1} steps (8 prompts x 8 samples, tiny model, CPU)")
    print(f"{'phase':<12} " + " ".join(f"{name:>11}" for name in CASES))
    for phase in PHASES:
        row = [statistics.mean(r.get(f"time/{phase}_s", 0.0) for r in records) for records in results.values()]
        print(f"{phase:<12} " + " ".join(f"{value:>11.3f}" for value in row))
    steps = {name: statistics.mean(r["time/step_s"] for r in records) for name, records in results.items()}
    print(f"{'step':<12} " + " ".join(f"{value:>11.3f}" for value in steps.values()))
    print(f"PPO with critic / GRPO step time: {steps['ppo_critic'] / steps['grpo']:.2f}x")


def _plan(args) -> None:
    from megatron_rl.config import load_config
    from megatron_rl.memory.plan import GIB, hf_config_for, plan_run

    plans = {}
    for name, extra in (("ppo_critic", ()), ("grpo", ("algorithm.advantage=grpo",))):
        cfg = load_config(args.plan, [f"model.path={args.model}", *extra])
        plans[name] = plan_run(cfg, hf_config_for(cfg), num_gpus=args.gpus, device="gpu",
                               device_bytes=int(args.gpu_memory_gib * GIB))
    for name, plan in plans.items():
        print(f"{name:<11} peak {plan.peak_bytes / GIB:6.1f} GiB in {plan.peak_phase:<7} fits: {plan.fits}")
    critic, grpo = plans["ppo_critic"], plans["grpo"]
    print(f"{'phase':<9} {'critic item':>12} {'phase total':>12} {'GRPO total':>11}")
    for phase, items in critic.phases.items():
        baseline = sum(grpo.phases[phase].values()) / GIB if phase in grpo.phases else float("nan")
        total = sum(items.values()) / GIB
        print(f"{phase:<9} {items['critic'] / GIB:>8.1f} GiB {total:>8.1f} GiB {baseline:>7.1f} GiB")
    print(f"peak with the critic - peak without: {(critic.peak_bytes - grpo.peak_bytes) / GIB:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sft", type=int, default=40)
    parser.add_argument("--keep", help="directory to keep the runs in (default: a temporary one)")
    parser.add_argument("--plan", metavar="RECIPE", help="print the memory plan's critic terms for this recipe")
    parser.add_argument("--model", help="with --plan: a model directory holding config.json")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    args = parser.parse_args()
    if args.plan:
        _plan(args)
    else:
        _time(args)


if __name__ == "__main__":
    main()
