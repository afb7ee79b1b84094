"""Weight sync speed: from "optimizer step finished" to "the vLLM engine serves the new weights".

    .venv/bin/python bench/weight_sync.py [--tp 1,2] [--cpu-gemm plain,packed] [--threads 2] [--bucket-mib 512]
                                          [--pushes 3]
    .venv/bin/python bench/weight_sync.py --gpu        # Qwen2.5-7B shape, bf16, TP=1; only where CUDA exists

A Qwen2.5-0.5B-shaped Megatron model (494M parameters, tied embeddings, random weights, fp32 on CPU) is
built at each TP size (TP=2: two processes, gloo); every process starts an in-process vLLM engine from the
same config with vLLM's dummy weights (DESIGN.md: the gloo group first, then vLLM), and rank 0 feeds it.
After a warm-up push and a weight update (every parameter changed in place: the "optimizer step"), it
times ``WeightSync.push`` (gather, un-fuse, cast, bucket, ``load_weights`` and vLLM's repacking), then a
one-token generation proves the engine serves. Baseline, measured in the same process right after each
push (the shared machine's load changes by the second): the memory-bandwidth floor, one ``copy_`` of every
byte the engine receives into a buffer already touched. Printed: push seconds (median) and the part spent
inside ``engine.load_weights``, floor seconds (median), the median of the per-push ratios, and the feeding rank's peak extra memory during a push (CPU: resident memory sampled every
2 ms, above that before the push; GPU: the torch allocator's peak above its allocation before it), and
the memory the sync keeps between pushes (its reused buffers).

On CPU each ``--cpu-gemm`` mode of the engine is measured (``VLLMEngine(cpu_gemm=...)``): 'plain' (a push
copies into the engine's weights in place) and 'packed' (vLLM's oneDNN-packed weights, re-packed by its
``reload_weights`` on every push). glibc hands freed blocks over 32 MiB back to the OS, so memory a push
allocates is page-faulted in again on every push (a copy into fresh memory cost 7-10x one into touched
memory here): the sync reuses its buffers, but vLLM's reload allocates per push in 'packed' mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

QWEN2_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
             "max_position_embeddings": 4096}
QWEN25_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False,
             "max_position_embeddings": 4096}


def make_model_dir(root: Path, shape: dict) -> Path:
    """A config + tokenizer directory (no weight files: the engine starts from dummy weights)."""
    from megatron_rl.testing import tiny_model

    path = tiny_model(root / "model")
    config = json.loads((path / "config.json").read_text())
    config.update(shape)
    config.pop("layer_types", None)  # per-layer list of the tiny model; derived again from num_hidden_layers
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "model.safetensors").unlink()
    return path


class PeakRSS:
    """Highest resident set size of this process while active, sampled in a thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self.process, self.interval_s, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def __enter__(self) -> Self:
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


class CopyFloor:
    """One copy of ``num_bytes`` into a buffer already written, timed on demand (both buffers kept)."""

    def __init__(self, num_bytes: int, device) -> None:
        import torch

        self.device = device
        self.src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
        self.dst = torch.zeros_like(self.src)

    def seconds(self) -> float:
        sync_device(self.device)
        start = time.perf_counter()
        self.dst.copy_(self.src)
        sync_device(self.device)
        return time.perf_counter() - start


def sync_device(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    """One rank: build the model and the engine, time pushes, measure the floor; rank 0 prints RESULT."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel
    from megatron_rl.rollout import SamplingConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine
    from megatron_rl.weight_sync import WeightSync

    gpu = torch.cuda.is_available()
    torch.set_num_threads(max(1, args.threads // args.tp))
    info = init_parallel(tp=args.tp)  # the process group before vLLM
    dtype = torch.bfloat16 if gpu else torch.float32
    engine_kwargs = {"gpu_memory_utilization": 0.4} if gpu else {"kv_cache_memory_bytes": 256 << 20}
    if not gpu:
        engine_kwargs["cpu_gemm"] = args.cpu_gemm
    engine = VLLMEngine(args.model_dir, dtype=str(dtype).removeprefix("torch."), max_model_len=512, seed=0,
                        load_format="dummy", **engine_kwargs)
    hf_config = AutoConfig.from_pretrained(args.model_dir)
    model = build_gpt_model(hf_config, tp_size=args.tp, params_dtype=dtype)
    feeds = info.tp_rank == 0
    sync = WeightSync(model, hf_config, bucket_bytes=args.bucket_mib << 20, dtype=dtype)
    sync.push(engine if feeds else None)  # warm-up: first-call costs (allocator, oneDNN primitives)
    floor = CopyFloor(sync.plan.num_bytes, sync.device) if feeds else None
    seconds, loads, peaks, serve, floors = [], [], [], [], []
    for step in range(args.pushes):
        with torch.no_grad():  # the optimizer step: every parameter changes in place
            for param in model.parameters():
                param.add_(1e-3 * (step + 1))
        sync_device(sync.device)
        dist.barrier()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        with PeakRSS() as rss:
            before = rss.rss()
            stats = sync.push(engine if feeds else None)
            dist.barrier()
        seconds.append(stats["seconds"])
        loads.append(stats["load_seconds"])
        peaks.append(torch.cuda.max_memory_allocated() - cuda_before if gpu else rss.peak - before)
        if feeds:
            start = time.perf_counter()
            engine.generate([[1, 2, 3]], SamplingConfig(temperature=0.0, max_tokens=1))
            serve.append(time.perf_counter() - start)
            floors.append(floor.seconds())
    if feeds:
        print("RESULT " + json.dumps({
            "tp": args.tp, "params": sum(p.numel() for p in model.parameters()) * args.tp,
            "bytes": sync.plan.num_bytes, "buckets": len(sync.plan.buckets), "push_s": statistics.median(seconds),
            "pushes_s": seconds, "load_s": statistics.median(loads), "floor_s": statistics.median(floors),
            "floors_s": floors, "ratio": statistics.median(s / f for s, f in zip(seconds, floors, strict=True)),
            "peak_extra_rss": max(peaks), "first_token_s": min(serve), "kept_bytes": sync.buffer_bytes,
        }), flush=True)
    dist.barrier()
    destroy_parallel()
    os._exit(0)  # skip vLLM's engine shutdown at exit (it tears down the process group again)


def launch(args: argparse.Namespace, tp: int, cpu_gemm: str) -> dict:
    """Run ``tp`` worker processes (env:// rendezvous) and return rank 0's RESULT."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(tp):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                   LOCAL_RANK=str(rank), VLLM_TARGET_DEVICE=os.environ.get("VLLM_TARGET_DEVICE", "cpu"))
        cmd = [sys.executable, __file__, "--worker", "--tp", str(tp), "--model-dir", str(args.model_dir),
               "--threads", str(args.threads), "--bucket-mib", str(args.bucket_mib), "--pushes", str(args.pushes),
               "--cpu-gemm", cpu_gemm]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate()[0] for proc in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise RuntimeError(f"TP={tp} rank {rank} exited with {proc.returncode}:\n{out[-3000:]}")
    line = next(line for line in outputs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", default="1,2", help="comma-separated TP sizes (one run each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the ranks)")
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--cpu-gemm", default="plain,packed", help="comma-separated VLLMEngine cpu_gemm modes (CPU)")
    parser.add_argument("--pushes", type=int, default=3, help="timed pushes (after one warm-up)")
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-7B shape, bf16, on CUDA")
    parser.add_argument("--num-layers", type=int, help="override the number of layers (a quicker, smaller run)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.tp = int(args.tp)
        worker(args)
        return
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs CUDA; none here, nothing measured")
        return
    shape = dict(QWEN25_7B if args.gpu else QWEN2_05B)
    if args.num_layers:
        shape["num_hidden_layers"] = args.num_layers
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = make_model_dir(Path(tmp), shape)
        tps = [int(t) for t in str(args.tp).split(",")]
        if args.gpu:
            tps = [1]  # one GPU
        modes = ["default"] if args.gpu else args.cpu_gemm.split(",")
        for tp, mode in ((tp, mode) for mode in modes for tp in tps):
            r = launch(args, tp, mode)
            print(f"TP={r['tp']}, cpu_gemm={mode}: {r['params'] / 1e6:.0f}M params, {r['bytes'] / 2**20:.0f} MiB in "
                  f"{r['buckets']} buckets of <= {args.bucket_mib} MiB")
            print(f"  push (step done -> engine serves): {r['push_s']:.3f} s (median of "
                  f"{[round(s, 3) for s in r['pushes_s']]})")
            print(f"    of which in engine.load_weights: {r['load_s']:.3f} s; "
                  f"gather + un-fuse + cast + bucket: {r['push_s'] - r['load_s']:.3f} s")
            print(f"  memory-bandwidth floor (one copy_ of every byte, after each push): {r['floor_s']:.3f} s "
                  f"(median of {[round(s, 3) for s in r['floors_s']]})")
            print(f"  ratio push / floor (median of the per-push ratios): {r['ratio']:.1f}x   (target <= 3x)")
            where = "GPU memory (torch allocator)" if args.gpu else "RSS"
            print(f"  peak extra {where} of the feeding rank during a push: {r['peak_extra_rss'] / 2**20:.0f} MiB; "
                  f"buffers the sync keeps between pushes: {r['kept_bytes'] / 2**20:.0f} MiB")
            print(f"  first generated token after the push: {r['first_token_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
