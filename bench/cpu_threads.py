"""vLLM generation on CPU by thread setting: tokens/s of each setting against the default, same run.

    .venv/bin/python bench/cpu_threads.py [--rounds 3] [--calls 3] [--prompts 8] [--n 4] [--max-tokens 48]
                                          [--layers 30] [--model DIR] [--environments default,omp-passive,...]

vLLM's CPU build logs "Reducing Torch threads from 2 to 1 for serving" when its in-process engine
starts. In this project's engine (``VLLMEngine``, in-process) that reduction never happens: vLLM has
replaced ``torch.set_num_threads`` with a no-op by then, and the engine restores the trainer's thread
count afterwards, so generation runs on torch's default (one thread per core). vLLM's own thread
binding (``VLLM_CPU_OMP_THREADS_BIND``) is applied only by its multi-process executor, which the
trainer does not use. This script measures what the choices cost:

* ``torch threads`` 2 (the default on two cores) or 1 (what vLLM's message intends), switched
  between calls of one engine (``torch.set_num_threads`` around ``generate``);
* the OpenMP environment the process starts with: none (default), ``OMP_PROC_BIND=close
  OMP_PLACES=cores`` (threads pinned to cores), ``OMP_WAIT_POLICY=passive`` (idle threads sleep
  instead of spinning), ``VLLM_CPU_OMP_THREADS_BIND=0-1`` (vLLM's knob; expected to change nothing
  in-process).

Each environment is a fresh process (OpenMP reads its environment once); the rounds interleave them
(round r runs every environment once, in turn, odd rounds in reverse order), and each process
alternates 2 and 1 threads call by call (the engine built with ``cpu_threads=None``, so the count
set here holds), so both thread counts of one process see the same load. Prints every setting's
median tokens/s over all its calls, the spread (min-max), and the ratio of medians to the default
(2 threads, no environment); ratios between environments are only as good as the load was steady.
The result and what the trainer does with it (``rollout.cpu_threads``): docs/training.md, "CPU
threads". The model: random weights in SmolLM2-135M's shape (``--layers`` 30, hidden 576, 9
heads, 3 KV heads, vocabulary 49,152; fp32), or ``--model``; responses nearly always run to
``--max-tokens`` (random weights seldom stop), and tokens/s counts the tokens generated.
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

ENVIRONMENTS = {
    "default": {},
    "omp-bind-cores": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
    "omp-passive": {"OMP_WAIT_POLICY": "passive"},
    "vllm-bind-0-1": {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
}
THREADS = (2, 1)


def make_model(path: Path, layers: int) -> Path:
    from megatron_rl.testing import tiny_model

    return tiny_model(path, num_hidden_layers=layers, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152)


def child(args: argparse.Namespace) -> None:
    """One process: an engine, then ``--calls`` timed generate calls per thread count, alternating."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import random

    import torch

    from megatron_rl.rollout.base import SamplingConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(rng.randint(64, 128))] for _ in range(args.prompts)]
    engine = VLLMEngine(args.model, max_model_len=512, seed=0, cpu_threads=None)  # the threads set below
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=1)
    rates: dict[int, list[float]] = {t: [] for t in THREADS}
    try:
        engine.generate(prompts[:2], sampling)  # warm-up
        for _ in range(args.calls):
            for threads in THREADS:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                tokens = sum(len(r.token_ids) for r in engine.generate(prompts, sampling))
                rates[threads].append(tokens / (time.perf_counter() - start))
    finally:
        engine.close()
    print("RESULT " + json.dumps({str(t): v for t, v in rates.items()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first-round", type=int, default=1, help="number of the first round (to add rounds later)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per thread count per process")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", help="HF model directory (default: random weights in SmolLM2-135M's shape)")
    parser.add_argument("--layers", type=int, default=30, help="layers of the default model")
    parser.add_argument("--environments", default=",".join(ENVIRONMENTS),
                        help=f"comma-separated, of {', '.join(ENVIRONMENTS)} (default is always measured)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    chosen = {"default", *args.environments.split(",")}
    unknown = sorted(chosen - set(ENVIRONMENTS))
    if unknown:
        parser.error(f"--environments: {unknown} unknown; choose from {', '.join(ENVIRONMENTS)}")
    environments = {name: extra for name, extra in ENVIRONMENTS.items() if name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_model(Path(tmp) / "model", args.layers))
        rates: dict[tuple[str, int], list[float]] = {(e, t): [] for e in environments for t in THREADS}
        for round_index in range(args.first_round - 1, args.first_round - 1 + args.rounds):
            order = list(environments.items())
            for name, extra in order[::-1] if round_index % 2 else order:  # odd rounds in reverse order
                command = [sys.executable, __file__, "--child", "--model", model, "--calls", str(args.calls),
                           "--prompts", str(args.prompts), "--n", str(args.n), "--max-tokens", str(args.max_tokens)]
                done = subprocess.run(command, env={**os.environ, **extra}, capture_output=True, text=True,
                                      check=False)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
                for threads, values in json.loads(line[len("RESULT "):]).items():
                    rates[(name, int(threads))] += values
                print(f"round {round_index + 1} {name}: " + ", ".join(
                    f"{t} threads {statistics.median(v):.1f} tok/s" for t, v in json.loads(line[7:]).items()),
                    flush=True)
    baseline = statistics.median(rates[("default", 2)])
    print(f"\n{'environment':<16} {'threads':>7} {'median tok/s':>12} {'min-max':>15} {'vs default':>10}")
    for (name, threads), values in rates.items():
        median = statistics.median(values)
        print(f"{name:<16} {threads:>7} {median:>12.1f} {min(values):>7.1f}-{max(values):<7.1f} "
              f"{median / baseline:>10.2f}")
    print(f"({len(rates[('default', 2)])} calls per setting; {args.prompts} prompts x n={args.n} x "
          f"{args.max_tokens} tokens per call; load average at the end: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
