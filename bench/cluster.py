"""Ray orchestration cost: actor start-up and per-step overhead, against a plain single-process run.

    .venv/bin/python bench/cluster.py [--steps 4] [--num-cpus 4]
    .venv/bin/python bench/cluster.py --model /models/Qwen2.5-0.5B-Instruct --gpu   # on a GPU machine

Two runs of the same GRPO steps (tiny 1-layer model on CPU by default, 2 prompts x 2 responses):

* baseline: ``megatron-rl train`` in one process, no Ray, TP=1, colocated vLLM engine;
* Ray: ``megatron_rl.cluster.launch`` with 2 trainer-rank actors (TP=2) and a separate vLLM engine actor.

Per step, the orchestration overhead is ``time/step_s`` minus the phases the loop times itself
(``time/generate_s``, ``time/score_s``, ``time/logprob_s``, ``time/update_s``, ``time/sync_s``: every
``time/*`` key but the step and checkpoint); the first step (warm-up) is left out. Printed: start-up
seconds of the Ray run (joining Ray, the placement group, the trainer actors up to their first
answer), the start of one engine actor (process, imports, model load: ``connect_engine``), and the
mean overhead per step of both runs with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = ["model.tiny_layers=1", "data.builtin_num_train=32", "data.builtin_num_test=4", "data.batch_size=2",
        "rollout.n=2", "rollout.max_response_length=8", "rollout.kv_cache_gib=0.25", "algorithm.micro_batch_size=4",
        "trainer.sft_warmup_steps=0", "trainer.test_freq=0", "trainer.export_hf=false", "trainer.progress_bar=false",
        "trainer.save_freq=0"]
PHASE_EXCLUDED = ("time/step_s", "time/checkpoint_s")


def step_times(metrics_file: Path) -> dict[str, list[float]]:
    """Per logged step after the first: 'overhead' (time/step_s minus the timed phases), 'step', 'generate',
    'sync' seconds."""
    out: dict[str, list[float]] = {"overhead": [], "step": [], "generate": [], "sync": []}
    for line in metrics_file.read_text().splitlines()[1:]:
        metrics = json.loads(line)
        phases = sum(v for k, v in metrics.items() if k.startswith("time/") and k not in PHASE_EXCLUDED)
        out["overhead"].append(metrics["time/step_s"] - phases)
        for key in ("step", "generate", "sync"):
            out[key].append(metrics[f"time/{key}_s"])
    return out


def baseline_run(run_dir: Path, overrides: list[str]) -> dict[str, list[float]]:
    subprocess.run([sys.executable, "-m", "megatron_rl.cli", "train", str(REPO / "examples" / "quickstart.yaml"),
                    *overrides, f"trainer.output_dir={run_dir}"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return step_times(run_dir / "metrics.jsonl")


def ray_run(run_dir: Path, overrides: list[str]) -> tuple[dict[str, float], dict[str, list[float]], float]:
    """(launch start-up seconds, per-step times, seconds to start one engine actor)."""
    import ray

    from megatron_rl.cluster.engine import connect_engine
    from megatron_rl.cluster.launch import launch
    from megatron_rl.config import load_config

    cfg = load_config(REPO / "examples" / "quickstart.yaml", [*overrides, f"trainer.output_dir={run_dir}"])
    result = launch(cfg)
    start = time.perf_counter()
    engine = connect_engine(cfg, run_dir / "tiny_model" if cfg.model.path == "tiny" else cfg.model.path)
    engine_start = time.perf_counter() - start
    engine.close()
    ray.shutdown()
    return result.startup_s, step_times(run_dir / "metrics.jsonl"), engine_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--model", default="tiny", help="HF model directory (default: the tiny model)")
    parser.add_argument("--gpu", action="store_true", help="trainer ranks and engine on GPUs")
    args = parser.parse_args()
    common = [*TINY, f"model.path={args.model}", f"trainer.total_steps={args.steps}"]
    ray_overrides = [*common, "parallel.tp=2", "cluster.num_trainers=2", "rollout.mode=separate",
                     f"cluster.local_num_cpus={args.num_cpus}", f"cluster.device={'gpu' if args.gpu else 'cpu'}"]
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_run(Path(tmp) / "baseline", common)
        startup, ray_steps, engine_start = ray_run(Path(tmp) / "ray", ray_overrides)
    print("\nRay start-up (s): " + ", ".join(f"{k} {v:.2f}" for k, v in startup.items() if k != "train"))
    print(f"engine actor start (s, connect_engine: process + imports + model load): {engine_start:.2f}")
    print(f"mean seconds per step over steps 2..{args.steps}:")
    print(f"{'run':<36}{'overhead':>10}{'step':>9}{'generate':>10}{'sync':>9}")
    for name, times in (("baseline: 1 process, colocated", base), ("Ray: 2 rank actors + engine actor", ray_steps)):
        print(f"{name:<36}" + "".join(f"{statistics.mean(times[k]):>{w}.4f}"
                                      for k, w in (("overhead", 10), ("step", 9), ("generate", 10), ("sync", 9))))
    base_mean, ray_mean = statistics.mean(base["overhead"]), statistics.mean(ray_steps["overhead"])
    print(f"overhead ratio Ray / baseline: {ray_mean / base_mean:.2f}x (difference {ray_mean - base_mean:+.4f} s "
          f"per step); step time ratio {statistics.mean(ray_steps['step']) / statistics.mean(base['step']):.2f}x")

if __name__ == "__main__":
    main()
