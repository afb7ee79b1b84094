"""Training throughput of one PPO policy step on CPU: megatron_rl (Megatron-Core, TP=1 in this process and
TP=2 over 2 gloo processes, DDP + Megatron AdamW) against plain transformers ``Qwen2ForCausalLM`` +
``torch.optim.AdamW``, same weights, same batch, same loss (token-mean PPO clip loss on
temperature-scaled logprobs), measured in the same run.

    .venv/bin/python bench/train_step.py [--threads 2] [--batch 4] [--seq 256] [--steps 5] [--no-tp2]
    .venv/bin/python bench/train_step.py --gpu [--batch 4] [--seq 2048] [--peak-tflops 989]

Prints tokens/s (all B*T tokens of the batch through forward + backward + optimizer step) for each and
the ratio to the transformers baseline. TP=2 runs 2 processes of ``threads // 2`` threads each (the
same cores as the others).

``--gpu``: model FLOPs utilisation of one megatron_rl train step of a Qwen2.5-0.5B-shaped model (random
weights) in bf16 with fp32 master weights on one CUDA device; exits with a message without CUDA.
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

import torch

# ~20M parameters with the 1024-token tokenizer (tied embeddings).
MODEL_SHAPE = {"hidden_size": 512, "num_hidden_layers": 7, "intermediate_size": 1408, "num_attention_heads": 8,
               "num_key_value_heads": 2}
# Qwen2.5-0.5B(-Instruct)'s config.json shape, for the GPU MFU figure.
QWEN25_05B_SHAPE = {"hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864, "num_attention_heads": 14,
                    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
                    "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
# Dense bf16 peak (TFLOP/s) per device name fragment; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
LR = 1e-6
TEMPERATURE = 1.0


def make_batch(vocab_size: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Fixed random ids (B, T); responses are the last 3/4 of each row; one advantage per row."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    mask = torch.zeros(batch, seq - 1, dtype=torch.bool)
    mask[:, seq // 4:] = True
    advantages = torch.linspace(-1, 1, batch)[:, None].expand(batch, seq - 1).contiguous()
    return {"ids": ids, "mask": mask, "advantages": advantages}


def time_steps(step, num_steps: int, warmup: int = 2, sync=lambda: None) -> float:
    """Median seconds of ``step()`` over ``num_steps`` runs after ``warmup`` runs (``sync`` waits for the
    device before each clock read)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(num_steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_step_fn(model_dir: str, batch: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    from megatron_rl import algorithms

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.01)
    ids, mask, advantages = batch["ids"], batch["mask"], batch["advantages"]
    num_tokens = int(mask.sum())
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float() / TEMPERATURE
        old_logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids).logits[:, :-1].float() / TEMPERATURE
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss, _metrics = algorithms.ppo_clip_loss(logprobs, old_logprobs, advantages, mask,
                                                  global_num_tokens=num_tokens)
        algorithms.aggregate(loss, mask, "token-mean", global_num_tokens=num_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def megatron_step_fn(model_dir: str, batch: dict[str, torch.Tensor], tp: int = 1):
    """One megatron_rl train step on this rank's TP shard of the HF weights in ``model_dir``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import init_parallel

    info = init_parallel(tp=tp, pp=1)
    hf_config = AutoConfig.from_pretrained(model_dir)
    model = build_gpt_model(hf_config, tp_size=tp, layer_spec="local")  # the HF name map is the local spec's
    load_hf_into_model(model, load_file(os.path.join(model_dir, "model.safetensors")), hf_config,
                       tp_rank=info.tp_rank, tp_size=tp)
    step = _train_step_closure(model, batch, hf_config.vocab_size, bf16=False)
    return step, sum(p.numel() for p in model.parameters()), info


def _train_step_closure(model, batch: dict[str, torch.Tensor], vocab_size: int, *, bf16: bool,
                        micro_batch_size: int | None = None):
    """Wrap ``model`` in DDP + Megatron AdamW and return ``step()``: one PPO train step on ``batch``
    (split into micro-batches of ``micro_batch_size`` rows; default one micro-batch)."""
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.optim import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_rl.megatron.train_step import LossSettings, MicroBatch, count_valid_tokens, train_step

    settings = OptimizerSettings(lr=LR, bf16=bf16)
    policy = wrap_ddp(model, settings)
    optimizer = build_optimizer(policy, settings)
    ids, mask, advantages = batch["ids"], batch["mask"], batch["advantages"]
    size = micro_batch_size or ids.shape[0]
    old_logprobs = forward_logprobs(model, ids, vocab_size=vocab_size, temperature=TEMPERATURE,
                                    micro_batch_size=size).logprobs.cpu()
    micro_batches = [MicroBatch(*parts) for parts in zip(ids.split(size), mask.split(size), old_logprobs.split(size),
                                                         advantages.split(size), strict=True)]
    num_tokens = count_valid_tokens(micro_batches)
    loss_settings = LossSettings(temperature=TEMPERATURE)

    def step() -> None:
        train_step(policy, optimizer, micro_batches, global_num_tokens=num_tokens, vocab_size=vocab_size,
                   settings=loss_settings)

    return step


def tp2_worker(out_file: str, model_dir: str, args: argparse.Namespace) -> None:
    """One rank of the TP=2 measurement (rank/world from the env); rank 0 writes ``{"seconds": ...}``."""
    from transformers import AutoConfig

    batch = make_batch(AutoConfig.from_pretrained(model_dir).vocab_size, args.batch, args.seq)
    step, _params, info = megatron_step_fn(model_dir, batch, tp=2)
    seconds = min(time_steps(step, args.steps) for _ in range(2))
    if info.rank == 0:
        with open(out_file, "w") as f:
            json.dump({"seconds": seconds}, f)


def run_tp2(model_dir: str, args: argparse.Namespace, timeout_s: float = 900) -> float:
    """Median step seconds of megatron_rl at TP=2: this script in 2 processes (gloo, env:// rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = os.path.join(model_dir, "tp2.json")
    threads = str(max(1, args.threads // 2))
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS=threads)
        cmd = [sys.executable, __file__, "--tp2-worker", out_file, model_dir, "--threads", threads,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=timeout_s)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        if proc.returncode != 0:
            raise RuntimeError(f"TP=2 rank {rank} exited with {proc.returncode}:\n{output[-3000:]}")
    with open(out_file) as f:
        return json.load(f)["seconds"]


def gpu_mfu(args: argparse.Namespace) -> None:
    """Print tokens/s and MFU of one bf16 train step of a Qwen2.5-0.5B-shaped model on one CUDA device.

    FLOPs per token: 6 x (parameters in matmuls, the tied output layer included, norms excluded) +
    12 x layers x seq x hidden for attention scores and values (forward + backward, counted without the
    causal half, as Megatron and PaLM report MFU)."""
    if not torch.cuda.is_available():
        raise SystemExit("bench/train_step.py --gpu needs a CUDA device; none is available here "
                         "(run it without --gpu for the CPU comparison)")
    from transformers import Qwen2Config

    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import init_parallel

    init_parallel(tp=1, pp=1)
    hf_config = Qwen2Config(**QWEN25_05B_SHAPE)
    model = build_gpt_model(hf_config, params_dtype=torch.bfloat16, layer_spec="auto")
    batch = make_batch(hf_config.vocab_size, args.batch, args.seq)  # train_step moves each micro-batch
    step = _train_step_closure(model, batch, hf_config.vocab_size, bf16=True, micro_batch_size=1)
    seconds = time_steps(step, args.steps, sync=torch.cuda.synchronize)
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    flops_per_token = 6 * matmul_params + 12 * hf_config.num_hidden_layers * args.seq * hf_config.hidden_size
    tokens = args.batch * args.seq
    achieved = flops_per_token * tokens / seconds / 1e12
    print(f"device: {name}; model: Qwen2.5-0.5B shape, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"params, layer spec {model.layer_spec!r}, bf16 + fp32 master weights; batch {args.batch} x {args.seq} "
          f"(micro-batches of 1)")
    print(f"megatron_rl TP=1: {tokens / seconds:8.0f} tokens/s  ({seconds * 1e3:.0f} ms/step), "
          f"{achieved:.1f} TFLOP/s model FLOPs")
    if peak is None:
        print(f"MFU: unknown peak for {name!r}; pass --peak-tflops")
    else:
        print(f"MFU: {achieved / peak:.1%} of {peak:.0f} TFLOP/s dense bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-tp2", action="store_true", help="skip the 2-process TP=2 row")
    parser.add_argument("--gpu", action="store_true", help="MFU of a Qwen2.5-0.5B-shaped model on one CUDA device")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (--gpu)")
    parser.add_argument("--tp2-worker", nargs=2, metavar=("OUT_JSON", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tp2_worker:
        tp2_worker(*args.tp2_worker, args)
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29512"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    if args.gpu:
        if args.seq == parser.get_default("seq"):
            args.seq = 2048
        gpu_mfu(args)
        return

    from megatron_rl.testing import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(tiny_model(tmp, **MODEL_SHAPE))
        from transformers import AutoConfig

        batch = make_batch(AutoConfig.from_pretrained(model_dir).vocab_size, args.batch, args.seq)
        tokens = args.batch * args.seq
        hf_step, hf_params = hf_step_fn(model_dir, batch)
        mg_step, mg_params, _info = megatron_step_fn(model_dir, batch)
        # Interleave the two measurements so that load changes on the machine hit both alike.
        hf_times, mg_times = [], []
        for _ in range(2):
            hf_times.append(time_steps(hf_step, args.steps))
            mg_times.append(time_steps(mg_step, args.steps))
        tp2_s = None if args.no_tp2 else run_tp2(model_dir, args)
    hf_s, mg_s = min(hf_times), min(mg_times)
    print(f"model: Qwen2 {MODEL_SHAPE}, {hf_params / 1e6:.1f}M params (megatron padded vocab: "
          f"{mg_params / 1e6:.1f}M); batch {args.batch} x {args.seq} = {tokens} tokens; {args.threads} threads; fp32")
    print(f"transformers + torch AdamW : {tokens / hf_s:8.0f} tokens/s  ({hf_s * 1e3:.0f} ms/step)")
    print(f"megatron_rl TP=1           : {tokens / mg_s:8.0f} tokens/s  ({mg_s * 1e3:.0f} ms/step)")
    print(f"ratio megatron_rl TP=1 / transformers: {hf_s / mg_s:.2f}x")
    if tp2_s is not None:
        print(f"megatron_rl TP=2 (2 procs x {max(1, args.threads // 2)} thr): {tokens / tp2_s:8.0f} tokens/s  "
              f"({tp2_s * 1e3:.0f} ms/step)")
        print(f"ratio megatron_rl TP=2 / transformers: {hf_s / tp2_s:.2f}x")


if __name__ == "__main__":
    main()
