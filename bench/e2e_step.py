"""Seconds per GRPO step of the quickstart, split per phase, and the share spent outside
generate + update (the loop's overhead: scoring, logprobs, sync, checkpoints, bookkeeping).

    .venv/bin/python bench/e2e_step.py [--steps 10] [--sft 40] [--keep DIR]

Runs `megatron-rl train examples/quickstart.yaml` (SFT warm-up first, so responses have realistic
lengths) with the quickstart's own validation and checkpoint frequencies, and reads the run's
metrics.jsonl. The first RL step (engine warm-up) and the last (the end-of-run save) are left out,
so the mean carries the quickstart's own rate of checkpoints and validations (one per 20 steps).
Target: overhead < 15% of the step.
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

PHASES = ("generate", "score", "logprob", "update", "sync", "validate", "checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sft", type=int, default=40)
    parser.add_argument("--keep", help="run directory to keep (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp) / "run"
        subprocess.run([sys.executable, "-m", "megatron_rl.cli", "train", str(REPO / "examples" / "quickstart.yaml"),
                        f"trainer.output_dir={out}", f"trainer.total_steps={args.steps + 1}",
                        f"trainer.sft_warmup_steps={args.sft}", "trainer.export_hf=false", "trainer.progress_bar=false"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        # steady state: without step 1 (engine warm-up) and the last step (its end-of-run save and validation)
        records = [r for r in read_metrics(out / "metrics.jsonl") if 2 <= r["step"] <= args.steps]
    step = statistics.mean(r["time/step_s"] for r in records)
    print(f"quickstart GRPO step, mean of {len(records)} steps (8 prompts x 8 samples, tiny model, CPU)")
    print(f"{'phase':<12} {'s/step':>8} {'share':>7}")
    for phase in PHASES:
        value = statistics.mean(r.get(f"time/{phase}_s", 0.0) for r in records)
        print(f"{phase:<12} {value:>8.3f} {value / step:>7.1%}")
    core = statistics.mean(r.get("time/generate_s", 0.0) + r.get("time/update_s", 0.0) for r in records)
    print(f"{'step':<12} {step:>8.3f}")
    print(f"overhead (outside generate + update): {(step - core):.3f} s = {(step - core) / step:.1%} of the step "
          f"(target < 15%)")


if __name__ == "__main__":
    main()
