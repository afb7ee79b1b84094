"""Checkpoint conversion speed and memory against the I/O floor, measured in the same run.

    .venv/bin/python bench/convert.py [--layers 16] [--tp 2] [--pp 2] [--shard-mb 256] [--dir /tmp/x]

Writes a random Qwen2-shaped fp32 model (hidden 1024, 16 layers, vocab 32000, untied: ~0.97 GB in
safetensors shards of 400 MB with an index), then, each in a fresh process:

- ``hf_to_megatron`` (TP/PP as given) and ``megatron_to_hf`` (output shards of ``--shard-mb``);
- the I/O floor of each direction: read every byte of its input files and write as many bytes as its
  output has, with plain ``read``/``write`` in 16 MB blocks (and fsync, as the DCP writer does).

Prints seconds (module imports excluded), the ratio to the floor (target: within 2x), and peak RSS of the converting process
above its RSS before the conversion (imports excluded), next to the bound the design asks for:
2 x the largest tensor + one output shard. The input files are in the page cache for both the floor
and the conversion (they were just written), so the floor is a memory-speed floor on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BLOCK = 16 * 1024 * 1024
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 2,
         "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 4096, "rope_theta": 1e6,
         "rms_norm_eps": 1e-6}


def make_model(path: Path, layers: int) -> tuple[int, int]:
    """Random fp32 weights with the HF names; returns (total bytes, largest tensor bytes)."""
    import torch
    from transformers import Qwen2Config

    from megatron_rl.checkpoint.hf_io import HFShardWriter
    from megatron_rl.checkpoint.layout import hf_tensor_shapes
    from megatron_rl.megatron.model import GPTShape

    path.mkdir(parents=True)
    config = Qwen2Config(num_hidden_layers=layers, **SHAPE)
    config.to_json_file(str(path / "config.json"))
    writer = HFShardWriter(path, max_shard_bytes=400 * 1024**2)
    generator = torch.Generator().manual_seed(0)
    largest = 0
    for name, dims in hf_tensor_shapes(GPTShape.from_hf(config)).items():
        tensor = torch.randn(dims, generator=generator) * 0.02
        largest = max(largest, tensor.numel() * 4)
        writer.add(name, tensor)
    writer.close()
    return writer.total_bytes, largest


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def io_floor(src: Path, nbytes_out: int, scratch: Path) -> None:
    """Read every file under ``src``, write ``nbytes_out`` bytes to one new file (fsync'd)."""
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        with open(file, "rb", buffering=0) as handle:
            while handle.read(BLOCK):
                pass
    block = os.urandom(BLOCK)
    with open(scratch, "wb", buffering=0) as handle:
        left = nbytes_out
        while left > 0:
            left -= handle.write(block[: min(BLOCK, left)])
        os.fsync(handle.fileno())
    scratch.unlink()


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import psutil

    from megatron_rl.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_rl.checkpoint.hf_io import load_hf_config

    if args.child != "floor":  # imports (transformers' config classes) are not part of the conversion
        load_hf_config(args.src)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    sampler = _PeakSampler(process)
    sampler.start()
    start = time.perf_counter()
    if args.child == "hf2m":
        hf_to_megatron(args.src, args.out, args.tp, args.pp)
    elif args.child == "m2h":
        megatron_to_hf(args.src, args.out, max_shard_bytes=args.shard_mb * 1024**2)
    else:
        io_floor(Path(args.src), int(args.nbytes), Path(args.out))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before": rss_before, "peak_rss": sampler.stop()}))


class _PeakSampler(threading.Thread):
    """Samples the RSS every 2 ms (ru_maxrss would include the transient peak of the imports)."""

    def __init__(self, process) -> None:
        super().__init__(daemon=True)
        self.process, self.peak, self.done = process, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(0.002)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def run_child(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--dir", help="scratch directory (default: a temporary one, deleted afterwards)")
    parser.add_argument("--child", choices=("hf2m", "m2h", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--nbytes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        hf, mcore, back = root / "hf", root / "mcore", root / "hf_back"
        total, largest = make_model(hf, args.layers)
        print(f"model: {total / 1e9:.2f} GB fp32 in {len(list(hf.glob('*.safetensors')))} shards, largest tensor "
              f"{largest / 1e6:.0f} MB; TP={args.tp} PP={args.pp}; {os.cpu_count()} CPU cores")
        common = ["--tp", str(args.tp), "--pp", str(args.pp), "--shard-mb", str(args.shard_mb)]
        to_megatron = run_child("--child", "hf2m", "--src", str(hf), "--out", str(mcore), *common)
        floor_1 = run_child("--child", "floor", "--src", str(hf), "--out", str(root / "scratch"),
                            "--nbytes", str(files_bytes(mcore)))
        to_hf = run_child("--child", "m2h", "--src", str(mcore), "--out", str(back), *common)
        floor_2 = run_child("--child", "floor", "--src", str(mcore), "--out", str(root / "scratch"),
                            "--nbytes", str(files_bytes(back)))
        bounds = {"hf->megatron": 2 * largest, "megatron->hf": 2 * largest + args.shard_mb * 1024**2}
        print(f"{'direction':<14} {'time s':>7} {'floor s':>8} {'ratio':>6} {'peak RSS - before MB':>21} "
              f"{'bound MB':>9}")
        for name, run, floor in (("hf->megatron", to_megatron, floor_1), ("megatron->hf", to_hf, floor_2)):
            grown = (run["peak_rss"] - run["rss_before"]) / 1e6
            print(f"{name:<14} {run['seconds']:>7.2f} {floor['seconds']:>8.2f} "
                  f"{run['seconds'] / floor['seconds']:>6.2f} {grown:>21.0f} {bounds[name] / 1e6:>9.0f}")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
