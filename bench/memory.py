"""The memory plan against measured memory, and what the memory knobs cost in update speed.

    .venv/bin/python bench/memory.py [--layers 2] [--threads 2]     # CPU: peak RSS vs the plan; tokens/s
    .venv/bin/python bench/memory.py --baseline                     # CPU: the process / engine baselines
    python bench/memory.py --gpu [--layers 24] [--seq 2048]         # CUDA: bytes per item vs the plan

CPU (default): a Qwen2.5-0.5B-shaped model (its widths and full 151,936-token vocabulary, ``--layers``
decoder layers instead of 24 so that a step takes seconds), fp32, random weights. Each row runs ONE
training step (Megatron DDP + AdamW, :func:`megatron_rl.megatron.train_step.train_step`, the trainer's own
micro-batching) in a fresh subprocess and reports its peak RSS above the process's RSS before the model was
built (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` against ``/proc/self/status`` VmRSS), next to the
plan's bytes for the same items (params + grads + optimizer + activations + logits of the update phase;
no engine, no reference). Rows: no recompute with all response logits at once (before), then full
recompute, then chunked logprobs, then token-budget micro-batches. Then the update's tokens/s on a batch of
mixed response lengths, fixed micro-batches against token-budget ones, in the same process (ratio).

``--baseline``: RSS of a process with torch + megatron-core + megatron_rl + vllm imported, and what a vLLM
CPU engine (tiny model, 64 MiB KV cache) adds beyond its weights and KV cache, after one generate call:
the sources of ``CPU_PROCESS_BASELINE_BYTES`` and ``CPU_ENGINE_OVERHEAD_BYTES`` in megatron_rl/memory/plan.py.

``--gpu``: on one CUDA device, the CUDA runtime's bytes outside PyTorch's allocator (after NCCL, cuBLAS and
a Megatron model exist), and for the 0.5B shape in bf16: params, gradient buffer, optimizer state (fp32
master + Adam), the activations a micro-batch saves (none / selective / full recompute, counted with
saved_tensors_hooks) and the update's peak allocated bytes, each next to the plan; and the caching
allocator's reserved/allocated ratio. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
              "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
              "num_hidden_layers": 24, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
"""Qwen2.5-0.5B-Instruct's config.json shape (its published numbers)."""
SHAPES = {
    "0.5b": QWEN25_05B,
    "3b": {**QWEN25_05B, "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
           "num_key_value_heads": 2, "num_hidden_layers": 36},
}
"""--gpu shapes: Qwen2.5-0.5B and Qwen2.5-3B(-Instruct) (published config.json numbers)."""

GIB, MIB = 1 << 30, 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def write_model(directory: Path, layers: int | None, shape: str = "0.5b") -> Path:
    """A directory holding only a config.json: ``shape`` (the 0.5B one with ``layers`` layers)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(SHAPES[shape])
    if layers is not None and shape == "0.5b":
        config["num_hidden_layers"] = layers
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def config_for(model_dir: Path, *, prompt: int, response: int, batch: int, n: int, micro: int, recompute: str,
               chunk: int, budget: int, bf16: bool = False, extra: tuple[str, ...] = ()):
    from megatron_rl.config import load_config

    return load_config(None, [
        f"model.path={model_dir}", f"data.max_prompt_length={prompt}", f"rollout.max_response_length={response}",
        f"data.batch_size={batch}", f"rollout.n={n}", f"algorithm.micro_batch_size={micro}",
        f"model.recompute={recompute}", f"algorithm.logprob_chunk_size={chunk}",
        f"algorithm.max_tokens_per_micro_batch={budget}", "algorithm.kl_coef=0", f"optim.bf16={str(bf16).lower()}",
        "model.layer_spec=local", *extra])


def mixed_batch(vocab: int, *, prompt: int, response_lengths: list[int], seed: int = 0):
    """A RolloutBatch of equal prompts and the given response lengths (right-padded, as the trainer packs)."""
    import torch

    from megatron_rl.trainer.batch import RolloutBatch

    rows, width = len(response_lengths), prompt + max(response_lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=generator)
    mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    for row, length in enumerate(response_lengths):
        mask[row, prompt - 1: prompt - 1 + length] = True
        ids[row, prompt + length:] = 0
    return RolloutBatch(input_ids=ids, response_mask=mask, rollout_logprobs=torch.zeros(rows, width - 1),
                        rewards=torch.linspace(-1, 1, rows), group_index=torch.arange(rows) // 4,
                        truncated=torch.zeros(rows, dtype=torch.bool))


def build_and_step(cfg, hf_config, batch, *, steps: int = 1, settings_kw=None, device=None) -> dict:
    """Build the policy (DDP + AdamW) for ``cfg`` and run ``steps`` train steps on ``batch`` with the trainer's
    micro-batching; returns seconds per step and tokens."""
    import torch

    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.optim import build_optimizer, wrap_ddp
    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step
    from megatron_rl.trainer.batch import make_micro_batches, padded_tokens

    dtype = torch.bfloat16 if cfg.optim.bf16 and torch.cuda.is_available() else torch.float32
    model = build_gpt_model(hf_config, params_dtype=dtype, recompute_granularity=cfg.model.recompute,
                            recompute_method=cfg.model.recompute_method,
                            recompute_num_layers=cfg.model.recompute_num_layers, layer_spec="local")
    if torch.cuda.is_available():  # the local spec's torch RMSNorm weights are built on the CPU in fp32
        for param in model.parameters():
            if param.device.type != "cuda":
                param.data = param.data.to("cuda", dtype)
    policy = wrap_ddp(model, cfg.optim)
    optimizer = build_optimizer(policy, cfg.optim)
    alg = cfg.algorithm
    rows = torch.arange(len(batch))
    micro_batches = make_micro_batches(batch, rows, micro_batch_size=alg.micro_batch_size,
                                       loss_mask=batch.response_mask, old_logprobs=None,
                                       advantages=batch.rewards[:, None].expand_as(batch.response_mask).contiguous(),
                                       ref_logprobs=None, max_tokens_per_micro_batch=alg.max_tokens_per_micro_batch)
    settings = LossSettings(kl_coef=0.0, entropy_coef=0.001, logprob_chunk_size=alg.logprob_chunk_size,
                            **(settings_kw or {}))
    num_tokens = count_valid_tokens(micro_batches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(policy, optimizer, micro_batches, global_num_tokens=num_tokens, vocab_size=hf_config.vocab_size,
                   settings=settings)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": times, "padded_tokens": padded_tokens(micro_batches), "micro_batches": len(micro_batches),
            "policy": policy, "optimizer": optimizer}


def init_world() -> None:
    from megatron_rl.megatron.parallel import init_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    init_parallel(1, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------- CPU


ROW_SETTINGS = (
    ("before: no recompute, all logits at once", {"recompute": "none", "chunk": 0, "budget": 0}),
    ("full recompute", {"recompute": "full", "chunk": 0, "budget": 0}),
    ("full recompute + chunked logprobs (256)", {"recompute": "full", "chunk": 256, "budget": 0}),
    ("full + chunked + token budget (1024)", {"recompute": "full", "chunk": 256, "budget": 1024}),
)


def cpu_row_worker(spec: dict) -> dict:
    """One row, in its own process: RSS before, peak RSS of one step."""
    import torch

    torch.set_num_threads(spec["threads"])
    from megatron_rl.memory import hf_config_for

    init_world()
    cfg = config_for(Path(spec["model_dir"]), **spec["cfg"])
    hf_config = hf_config_for(cfg)
    batch = mixed_batch(hf_config.vocab_size, prompt=spec["cfg"]["prompt"], response_lengths=spec["lengths"])
    before = rss_bytes()
    result = build_and_step(cfg, hf_config, batch)
    return {"rss_before": before, "peak_rss": peak_rss_bytes(), "seconds": result["seconds"][0]}


def run_cpu(args: argparse.Namespace) -> None:
    from megatron_rl.memory import plan_run
    from megatron_rl.memory import hf_config_for

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "qwen05", args.layers)
        prompt, response, n = 128, 256, 4
        lengths = [response] + [response * (n * 2 - i) // (n * 2 + 1) for i in range(1, 2 * n)]  # 256 .. 36
        base = {"prompt": prompt, "response": response, "batch": 2, "n": n, "micro": 4}
        print(f"Qwen2.5-0.5B widths, {args.layers} layers, vocab 151936, fp32 on CPU ({args.threads} threads); "
              f"{len(lengths)} sequences: prompt {prompt} + responses {lengths}")
        print(f"{'row':<44}{'plan GiB':>10}{'measured GiB':>14}{'meas/plan':>10}{'step s':>8}")
        for name, row in ROW_SETTINGS:
            cfg = config_for(model_dir, **base, recompute=row["recompute"], chunk=row["chunk"], budget=row["budget"])
            plan = plan_run(cfg, hf_config_for(cfg), num_gpus=1, device="cpu", device_bytes=64 * GIB)
            update = plan.phases["update"]
            predicted = sum(update[k] for k in ("params", "grads", "optimizer", "activations", "logits"))
            spec = {"model_dir": str(model_dir), "cfg": {**base, **row}, "lengths": lengths, "threads": args.threads}
            out = subprocess.run([sys.executable, __file__, "--cpu-row", json.dumps(spec)], capture_output=True,
                                 text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if out.returncode:
                raise RuntimeError(f"row {name!r} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            delta = measured["peak_rss"] - measured["rss_before"]
            print(f"{name:<44}{predicted / GIB:>10.2f}{delta / GIB:>14.2f}{delta / predicted:>10.2f}"
                  f"{measured['seconds']:>8.1f}")
        throughput(model_dir, base, lengths, args)


def throughput(model_dir: Path, base: dict, lengths: list[int], args: argparse.Namespace) -> None:
    """Update tokens/s on the mixed batch: fixed micro-batches of 4 against a 1024-token budget, same process."""
    import torch

    from megatron_rl.memory import hf_config_for

    torch.set_num_threads(args.threads)
    init_world()
    results = {}
    for name, budget in (("fixed micro-batches of 4", 0), ("token budget 1024", 1024)):
        cfg = config_for(model_dir, **base, recompute="full", chunk=256, budget=budget)
        hf_config = hf_config_for(cfg)
        batch = mixed_batch(hf_config.vocab_size, prompt=base["prompt"], response_lengths=lengths)
        result = build_and_step(cfg, hf_config, batch, steps=args.steps + 1)
        seconds = min(result["seconds"][1:])  # the first step allocates Adam's state
        real = int(batch.response_mask.sum()) + len(lengths) * base["prompt"]
        results[name] = (real / seconds, result["padded_tokens"], result["micro_batches"], seconds)
        del result
    print(f"\nupdate throughput, {len(lengths)} sequences ({sum(lengths) + len(lengths) * base['prompt']} real "
          f"tokens), full recompute, chunk 256, best of {args.steps} steps:")
    for name, (tps, padded, micro, seconds) in results.items():
        print(f"  {name:<26} {tps:8.0f} tokens/s  ({micro} micro-batches, {padded} padded tokens, {seconds:.1f} s)")
    fixed, budget = (results[k][0] for k in results)
    print(f"  ratio token budget / fixed: {budget / fixed:.2f}x")


# -------------------------------------------------------------------------------------------- baseline


def run_baseline() -> None:
    start = rss_bytes()
    import torch  # noqa: F401

    import megatron.core  # noqa: F401

    import megatron_rl.trainer.loop  # noqa: F401

    imported = rss_bytes()
    import vllm  # noqa: F401

    with_vllm = rss_bytes()
    from megatron_rl.rollout.base import SamplingConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.testing import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model(Path(tmp) / "tiny")
        weights = (model_dir / "model.safetensors").stat().st_size
        kv = 64 * MIB
        before_engine = rss_bytes()
        engine = VLLMEngine(model_dir, max_model_len=512, kv_cache_memory_bytes=kv, seed=0)
        engine.generate([[1, 2, 3, 4]], SamplingConfig(n=2, temperature=1.0, max_tokens=16))
        after = max(rss_bytes(), peak_rss_bytes())
        engine.close()
    print(f"python: {start / MIB:.0f} MiB; + torch, megatron-core, megatron_rl: {imported / MIB:.0f} MiB; "
          f"+ vllm: {with_vllm / MIB:.0f} MiB (CPU_PROCESS_BASELINE_BYTES)")
    print(f"engine (tiny model, {weights / MIB:.1f} MiB of weights, {kv / MIB:.0f} MiB KV cache), peak after one "
          f"generate: +{(after - before_engine) / MIB:.0f} MiB; beyond weights and KV cache: "
          f"{(after - before_engine - weights - kv) / MIB:.0f} MiB (CPU_ENGINE_OVERHEAD_BYTES)")


# ------------------------------------------------------------------------------------------------- GPU


def run_gpu(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    from megatron_rl.memory import hf_config_for, plan_run
    from megatron_rl.memory.measure import (
        SavedActivations,
        gradient_buffer_bytes,
        optimizer_state_bytes,
        parameter_bytes,
    )
    from megatron_rl.memory.plan import layer_activation_bytes

    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    init_world()
    free, total = torch.cuda.mem_get_info()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    torch.distributed.all_reduce(torch.ones(1024, device="cuda"))
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    report["runtime_bytes"] = total - free - torch.cuda.memory_reserved()
    report["total_bytes"] = total
    del a
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "model", args.layers, args.shape)
        prompt, response = args.seq // 5, args.seq - args.seq // 5
        rows = []
        report["shape"], report["seq"], report["micro"] = args.shape, args.seq, args.micro
        for recompute in args.recompute:
            for distributed in (False, True) if recompute == "none" else (False,):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                cfg = config_for(model_dir, prompt=prompt, response=response, batch=1, n=args.micro, micro=args.micro,
                                 recompute=recompute, chunk=1024, budget=0, bf16=True,
                                 extra=(f"optim.use_distributed_optimizer={str(distributed).lower()}",))
                hf_config = hf_config_for(cfg)
                plan = plan_run(cfg, hf_config, num_gpus=1, device="gpu", device_bytes=total)
                batch = mixed_batch(hf_config.vocab_size, prompt=prompt, response_lengths=[response] * args.micro)
                base_alloc = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                try:
                    result = build_and_step(cfg, hf_config, batch, steps=1)  # Adam's state now exists
                except Exception as err:  # report and go on with the next row
                    import traceback

                    traceback.print_exc()
                    rows.append({"recompute": recompute, "error": repr(err)})
                    continue
                policy, optimizer = result["policy"], result["optimizer"]
                measured = {"params": parameter_bytes(policy), "grads": gradient_buffer_bytes(policy),
                            "optimizer": optimizer_state_bytes(optimizer, policy)}
                before_step = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                with SavedActivations(policy) as saved:
                    build_step_again(policy, optimizer, cfg, hf_config, batch)
                peak = torch.cuda.max_memory_allocated() - before_step
                reserved_ratio = torch.cuda.max_memory_reserved() / max(1, torch.cuda.max_memory_allocated())
                max_reserved = torch.cuda.max_memory_reserved()
                process_peak = max_reserved + report["runtime_bytes"]
                logprob_peak = logprob_pass_peak(policy, cfg, hf_config, batch)
                update = plan.phases["update"]
                rows.append({
                    "recompute": recompute, "distributed_optimizer": distributed,
                    "measured": {**measured, "saved_activations": saved.peak_bytes,
                                 "recompute_bytes": saved.recompute_bytes, "step_peak_above_state": peak,
                                 "allocated_before_build": base_alloc, "reserved_over_allocated": reserved_ratio,
                                 "logprob_pass_peak": logprob_peak, "max_reserved": max_reserved,
                                 "process_peak_with_runtime": process_peak},
                    "plan": {**{k: update[k] for k in ("params", "grads", "optimizer", "activations", "logits")},
                             "logprob_activations": plan.phases["logprob"]["activations"],
                             "update_without_engine_sync_reference": sum(
                                 v for k, v in update.items() if k not in ("engine", "sync_buffers", "reference"))},
                })
                print(json.dumps(rows[-1]), flush=True)
                del policy, optimizer, result, saved
                gc.collect()
        report["rows"] = rows
        dims_note = layer_activation_bytes.__doc__.splitlines()[0]
        report["note"] = dims_note
    print(json.dumps(report))
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_memory.json").write_text(json.dumps(report, indent=1))


def logprob_pass_peak(policy, cfg, hf_config, batch) -> int:
    """Peak bytes allocated above the start by one no-grad logprob pass (the old / reference logprobs)."""
    import torch

    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.optim import unwrap_ddp

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    forward_logprobs(unwrap_ddp(policy), batch.input_ids, vocab_size=hf_config.vocab_size,
                     micro_batch_size=cfg.algorithm.micro_batch_size, mask=batch.response_mask,
                     chunk_size=cfg.algorithm.logprob_chunk_size)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def build_step_again(policy, optimizer, cfg, hf_config, batch) -> None:
    """A second train step on the same model (its optimizer state exists), inside the caller's hooks."""
    import torch

    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step
    from megatron_rl.trainer.batch import make_micro_batches

    alg = cfg.algorithm
    micro = make_micro_batches(batch, torch.arange(len(batch)), micro_batch_size=alg.micro_batch_size,
                               loss_mask=batch.response_mask, old_logprobs=None,
                               advantages=batch.rewards[:, None].expand_as(batch.response_mask).contiguous(),
                               ref_logprobs=None, max_tokens_per_micro_batch=alg.max_tokens_per_micro_batch)
    train_step(policy, optimizer, micro, global_num_tokens=count_valid_tokens(micro), vocab_size=hf_config.vocab_size,
               settings=LossSettings(kl_coef=0.0, entropy_coef=0.001, logprob_chunk_size=alg.logprob_chunk_size))
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 2 on CPU, 24 on GPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per throughput row")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--seq", type=int, default=2048, help="--gpu: tokens per sequence (half prompt)")
    parser.add_argument("--micro", type=int, default=2, help="--gpu: sequences per micro-batch")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b",
                        help="--gpu: model shape (layers from --layers only for 0.5b)")
    parser.add_argument("--recompute", nargs="+", default=["none", "selective", "full"], help="--gpu: rows")
    parser.add_argument("--cpu-row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_row:
        print(json.dumps(cpu_row_worker(json.loads(args.cpu_row))))
    elif args.baseline:
        run_baseline()
    elif args.gpu:
        args.layers = args.layers or 24
        run_gpu(args)
    else:
        args.layers = args.layers or 2
        run_cpu(args)


if __name__ == "__main__":
    main()
