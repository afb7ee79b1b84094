"""Rollout speed: generated tokens/second of the vLLM engine against transformers ``generate``.

    .venv/bin/python bench/rollout.py [--threads 2] [--prompts 16] [--n 4] [--max-tokens 64] [--dtype float32]
                                      [--cpu-gemm plain,packed]
    .venv/bin/python bench/rollout.py --model DIR|smollm2-135m-instruct --data FILE.parquet [--prompts 4] [--n 4]

Same run, same model (the tiny Qwen2 of megatron_rl.testing, random weights, or ``--model``: an HF
directory or a name ``megatron-rl fetch-model`` knows), same prompts (random token ids, 8-32 tokens,
seeded; with ``--data``, the first ``--prompts`` rows of a parquet file, rendered and tokenised as the
trainer does), same sampling (temperature 1, top_p 1, ``--n`` samples
per prompt, at most ``--max-tokens`` tokens, stop on EOS). vLLM runs through
:class:`~megatron_rl.rollout.vllm_engine.VLLMEngine` (in-process, continuous batching); the baseline is
one batched transformers ``generate`` call over all prompts (left padding, ``num_return_sequences=n``).
Tokens are the response tokens each produced (up to and including EOS); the best of ``--repeats`` runs
counts. Prints both rates and their ratio (vLLM / transformers). On CPU the engine runs once per
``--cpu-gemm`` mode (``VLLMEngine(cpu_gemm=...)``: linear layers on their plain weights, which a weight
push copies in place, or on vLLM's oneDNN-packed copies, which it re-packs), one after the other.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def make_prompts(num_prompts: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(8, 32))] for _ in range(num_prompts)]


def best_rate(run, repeats: int) -> tuple[float, int]:
    """(tokens/s, tokens) of the fastest of ``repeats`` calls to ``run() -> tokens``."""
    best = (0.0, 0)
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        rate = tokens / (time.perf_counter() - start)
        best = max(best, (rate, tokens))
    return best


def transformers_run(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace, stop_ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    pad = stop_ids[0]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    @torch.no_grad()
    def run() -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=args.max_tokens, num_return_sequences=args.n,
                             eos_token_id=stop_ids, pad_token_id=pad)[:, width:]
        tokens = 0
        for row in out.tolist():  # count up to and including the first stop token
            stops = [i for i, t in enumerate(row) if t in stop_ids]
            tokens += stops[0] + 1 if stops else len(row)
        return tokens

    return run, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", "--model-dir", dest="model_dir", type=str,
                        help="an HF checkpoint or a fetch-model name (default: the tiny test model)")
    parser.add_argument("--data", type=Path, help="real prompts: the first --prompts rows of this parquet file")
    parser.add_argument("--cpu-gemm", default="plain,packed", help="comma-separated VLLMEngine cpu_gemm modes (CPU)")
    args = parser.parse_args()

    import torch

    from megatron_rl.rollout import SamplingConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.testing import tiny_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model_dir(args.model_dir) if args.model_dir else tiny_model(Path(tmp) / "tiny")
        stop_ids = _stop_ids(model_dir)
        sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
        modes = ["default"] if torch.cuda.is_available() else args.cpu_gemm.split(",")
        real_prompts = _real_prompts(model_dir, args.data, args.prompts) if args.data else None
        longest = max(map(len, real_prompts)) if real_prompts else 32
        vllm_rates = {}
        for mode in modes:
            gemm = {} if mode == "default" else {"cpu_gemm": mode}
            engine = VLLMEngine(model_dir, dtype=args.dtype, max_model_len=max(512, longest + args.max_tokens),
                                seed=0, **gemm)
            torch.set_num_threads(args.threads)
            prompts = real_prompts or make_prompts(args.prompts, engine.vocab_size - 3)  # not the special tokens

            def vllm_run(engine=engine, prompts=prompts) -> int:
                return sum(len(r.token_ids) for r in engine.generate(prompts, sampling))

            vllm_run()  # warm-up
            vllm_rates[mode] = best_rate(vllm_run, args.repeats)
            engine.close()
        hf, params = transformers_run(model_dir, prompts, args, stop_ids)
        hf()  # warm-up
        hf_rate, hf_tokens = best_rate(hf, args.repeats)
    where = (f"prompts of {args.data} ({min(map(len, real_prompts))}-{longest} tokens)" if real_prompts
             else "random-id prompts")
    print(f"model: {model_dir}, {params / 1e6:.1f}M params ({args.dtype}), {args.prompts} {where} x n={args.n}, "
          f"<= {args.max_tokens} tokens, temperature 1, {args.threads} threads")
    for mode, (vllm_rate, vllm_tokens) in vllm_rates.items():
        label = "vLLM engine" + ("" if mode == "default" else f", cpu_gemm={mode}")
        print(f"{label + ':':32s}{vllm_rate:8.0f} tokens/s ({vllm_tokens} tokens), "
              f"{vllm_rate / hf_rate:.2f}x transformers")
    print(f"{'transformers generate:':32s}{hf_rate:8.0f} tokens/s ({hf_tokens} tokens)")
    os._exit(0)  # skip vLLM's shutdown at exit


def _model_dir(name_or_dir: str) -> Path:
    """An HF directory, or the cached copy of a model ``megatron-rl fetch-model`` knows (fetched if absent)."""
    from megatron_rl.models import resolve_model_path

    return resolve_model_path(name_or_dir)


def _real_prompts(model_dir: Path, data: Path, count: int) -> list[list[int]]:
    """The first ``count`` rows of ``data``: their prompts rendered and tokenised as the trainer does."""
    from transformers import AutoTokenizer

    from megatron_rl.data.dataset import render_prompts, tokenize
    from megatron_rl.data.schema import read_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    rows, _ = read_rows(data)
    return tokenize(render_prompts(rows[:count], tokenizer), tokenizer)


def _stop_ids(model_dir: Path) -> list[int]:
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


if __name__ == "__main__":
    main()
