"""Training throughput of one PPO policy step on CPU: megatron_rl (Megatron-Core, TP=1 in this process and
TP=2 over 2 gloo processes, DDP + Megatron AdamW) against plain transformers ``Qwen2ForCausalLM`` +
``torch.optim.AdamW``, same weights, same batch, same loss (token-mean PPO clip loss on
temperature-scaled logprobs), measured in the same run.

    .venv/bin/python bench/train_step.py [--threads 2] [--batch 4] [--seq 256] [--steps 5] [--no-tp2]
    .venv/bin/python bench/train_step.py --gpu [--batch 4] [--seq 2048] [--peak-tflops 989]
    .venv/bin/python bench/train_step.py --model DIR|smollm2-135m-instruct --data FILE.parquet [--batch 16]
        [--response-tokens 256] [--micro-batch 4] [--max-tokens-per-micro-batch N] [--logprob-chunk-size N]
        [--profile]

Prints tokens/s (all B*T tokens of the batch through forward + backward + optimizer step) for each and
the ratio to the transformers baseline. TP=2 runs 2 processes of ``threads // 2`` threads each (the
same cores as the others).

``--model``: a real model (an HF directory, or a name ``megatron-rl fetch-model`` knows) on a batch made
the way the trainer makes it: the first ``--batch`` rows of ``--data`` with their full rendered prompts,
each followed by ``--response-tokens`` response tokens (seeded random ids), right-padded to the longest
row; the loss covers the response tokens. Both sides run in micro-batches of ``--micro-batch`` rows at the
padded width (megatron_rl: or token-budget micro-batches with ``--max-tokens-per-micro-batch``). Tokens/s
count the real (unpadded) tokens. ``--profile`` adds where one megatron_rl step spends its time
(torch.profiler: attention scores, output layer + logprobs over the vocabulary, other matmuls, the rest;
the optimizer step timed apart).

``--gpu``: model FLOPs utilisation of one megatron_rl train step of a Qwen2.5-0.5B-shaped model (random
weights) in bf16 with fp32 master weights on one CUDA device; exits with a message without CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def real_model_batch(model_dir: str, data_file: str, batch: int, response_tokens: int) -> dict[str, torch.Tensor]:
    """The first ``batch`` rows of ``data_file``, full prompts rendered and tokenised as the trainer does,
    each + ``response_tokens`` seeded random response ids, right-padded to the longest row (the trainer's
    layout); one advantage per row. ``lengths``: each row's real tokens."""
    from transformers import AutoTokenizer

    from megatron_rl.data.dataset import render_prompts, tokenize
    from megatron_rl.data.schema import read_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    rows, _ = read_rows(data_file)
    if len(rows) < batch:
        raise SystemExit(f"{data_file} has {len(rows)} rows; --batch {batch} needs that many")
    prompts = tokenize(render_prompts(rows[:batch], tokenizer), tokenizer)
    generator = torch.Generator().manual_seed(0)
    lengths = [len(p) + response_tokens for p in prompts]
    seq = max(lengths)
    ids = torch.full((batch, seq), tokenizer.eos_token_id, dtype=torch.int64)
    mask = torch.zeros(batch, seq - 1, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        response = torch.randint(0, len(tokenizer) - 32, (response_tokens,), generator=generator)
        ids[row, :len(prompt)] = torch.tensor(prompt)
        ids[row, len(prompt):lengths[row]] = response
        mask[row, len(prompt) - 1:lengths[row] - 1] = True
    advantages = torch.linspace(-1, 1, batch)[:, None].expand(batch, seq - 1).contiguous()
    return {"ids": ids, "mask": mask, "advantages": advantages, "lengths": torch.tensor(lengths)}


def profile_step(step, padded_vocab: int) -> dict[str, float]:
    """Self CPU seconds of one ``step()`` per part (torch.profiler, shapes recorded): 'attention scores'
    (ops on a [.., T, T] tensor: QK^T, softmax, probs x V and their backward), 'output layer + logprobs'
    (ops on a tensor with the padded vocabulary as a dimension), 'other matmuls' (the decoder's linear
    layers) and 'other' (norms, RoPE, activations, element-wise, optimizer maths, copies)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    parts: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if not event.key.startswith("aten::") or event.self_cpu_time_total <= 0:
            continue
        shapes = [tuple(shape) for shape in (event.input_shapes or []) if isinstance(shape, (list, tuple))]
        if any(padded_vocab in shape for shape in shapes):
            part = "output layer + logprobs (vocab)"
        elif any(len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] >= 64 for shape in shapes):
            part = "attention scores (T x T)"
        elif event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"):
            part = "other matmuls (linear layers)"
        else:
            part = "other (norms, RoPE, SiLU, element-wise, optimizer, copies)"
        parts[part] = parts.get(part, 0.0) + event.self_cpu_time_total / 1e6
    return parts


def model_mode(args: argparse.Namespace) -> None:
    """--model: megatron_rl against transformers on a real model and a real-row batch (see the module doc)."""
    from transformers import AutoConfig

    from megatron_rl.megatron.model import padded_vocab_size

    model_dir = args.model
    try:  # a name fetch-model knows (where this checkout has the models package)
        from megatron_rl.models import resolve_model_path

        model_dir = str(resolve_model_path(args.model))
    except ImportError:
        pass
    if not args.data:
        raise SystemExit("--model needs --data FILE.parquet (e.g. the Med-U1 mediq.parquet)")
    batch = real_model_batch(model_dir, args.data, args.batch, args.response_tokens)
    hf_config = AutoConfig.from_pretrained(model_dir)
    real_tokens = int(batch["lengths"].sum())
    padded = batch["ids"].numel()
    micro = args.micro_batch or args.batch
    timings: dict[str, float] = {}
    mg_step, mg_params, _info = megatron_step_fn(
        model_dir, batch, micro_batch_size=micro, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        logprob_chunk_size=args.logprob_chunk_size, timings=timings)
    hf_step, hf_params = (None, None) if args.no_hf else hf_step_fn(model_dir, batch, micro_batch_size=micro)
    hf_times, mg_times = [], []
    for _ in range(args.rounds):  # interleaved: load changes on the machine hit both alike
        if hf_step is not None:
            hf_times.append(time_steps(hf_step, args.steps, warmup=1))
        mg_times.append(time_steps(mg_step, args.steps, warmup=1))
    mg_s = min(mg_times)
    print(f"model: {model_dir} ({hf_config.model_type}, {mg_params / 1e6:.1f}M params); batch {args.batch} rows of "
          f"{args.data} + {args.response_tokens} response tokens: {real_tokens} tokens, padded to "
          f"{batch['ids'].shape[1]} = {padded} ({1 - real_tokens / padded:.0%} padding); {args.threads} threads; fp32")
    mode = (f"token budget {args.max_tokens_per_micro_batch}" if args.max_tokens_per_micro_batch
            else f"{micro} rows each")
    print(f"megatron_rl micro-batches: {mg_step.num_micro_batches} ({mode}, {mg_step.padded_tokens} padded tokens); "
          f"logprob chunk: {args.logprob_chunk_size if args.logprob_chunk_size is not None else 'default'}")
    if hf_times:
        hf_s = min(hf_times)
        print(f"transformers + torch AdamW : {real_tokens / hf_s:8.0f} tokens/s  ({hf_s:.2f} s/step, micro-batches "
              f"of {micro} rows at the padded width)")
    print(f"megatron_rl TP=1           : {real_tokens / mg_s:8.0f} tokens/s  ({mg_s:.2f} s/step; optimizer step "
          f"{timings.get('optimizer_s', float('nan')):.2f} s)")
    if hf_times:
        print(f"ratio megatron_rl TP=1 / transformers: {min(hf_times) / mg_s:.2f}x")
    if args.profile:
        parts = profile_step(mg_step, padded_vocab_size(hf_config.vocab_size, 128, 1))
        total = sum(parts.values())
        print(f"where one megatron_rl step's time goes (torch.profiler self CPU time, {total:.1f} s in aten ops):")
        for name, seconds in sorted(parts.items(), key=lambda item: -item[1]):
            print(f"  {name:58s} {seconds:7.2f} s  {seconds / total:5.1%}")
        print(f"  (optimizer step, timed apart: {timings.get('optimizer_s', float('nan')):.2f} s of the step)")


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


def hf_step_fn(model_dir: str, batch: dict[str, torch.Tensor], micro_batch_size: int | None = None):
    """One PPO step of transformers + torch AdamW on ``batch``, in micro-batches of ``micro_batch_size``
    rows (gradients accumulated; default one micro-batch)."""
    from transformers import AutoModelForCausalLM

    from megatron_rl import algorithms

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.01)
    ids, mask, advantages = batch["ids"], batch["mask"], batch["advantages"]
    size = micro_batch_size or ids.shape[0]
    num_tokens = int(mask.sum())

    def logprobs_of(rows: torch.Tensor) -> torch.Tensor:
        logits = model(rows).logits[:, :-1].float() / TEMPERATURE
        return torch.log_softmax(logits, -1).gather(-1, rows[:, 1:, None]).squeeze(-1)

    with torch.no_grad():
        old_logprobs = torch.cat([logprobs_of(rows) for rows in ids.split(size)])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for part in zip(ids.split(size), mask.split(size), old_logprobs.split(size), advantages.split(size)):
            rows, rows_mask, rows_old, rows_advantages = part
            loss, _metrics = algorithms.ppo_clip_loss(logprobs_of(rows), rows_old, rows_advantages, rows_mask,
                                                      global_num_tokens=num_tokens)
            algorithms.aggregate(loss, rows_mask, "token-mean", global_num_tokens=num_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def megatron_step_fn(model_dir: str, batch: dict[str, torch.Tensor], tp: int = 1, **micro):
    """One megatron_rl train step on this rank's TP shard of the HF weights in ``model_dir`` (``micro``:
    the micro-batch options of :func:`_train_step_closure`)."""
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
    step = _train_step_closure(model, batch, hf_config.vocab_size, bf16=False, **micro)
    return step, sum(p.numel() for p in model.parameters()), info


def _train_step_closure(model, batch: dict[str, torch.Tensor], vocab_size: int, *, bf16: bool,
                        micro_batch_size: int | None = None, max_tokens_per_micro_batch: int = 0,
                        logprob_chunk_size: int | None = None, timings: dict[str, float] | None = None):
    """Wrap ``model`` in DDP + Megatron AdamW and return ``step()``: one PPO train step on ``batch``
    (split into micro-batches of ``micro_batch_size`` rows, default one micro-batch; or, where the trainer
    has them, token-budget micro-batches of at most ``max_tokens_per_micro_batch`` padded tokens).
    ``logprob_chunk_size``: tokens per chunk of the output layer (where the trainer has the knob; None:
    its default). ``timings``: gets ``optimizer_s``, the optimizer step's seconds of the last step."""
    import inspect

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
    if max_tokens_per_micro_batch:
        from megatron_rl.trainer.batch import RolloutBatch, make_micro_batches

        if "max_tokens_per_micro_batch" not in inspect.signature(make_micro_batches).parameters:
            raise SystemExit("--max-tokens-per-micro-batch: this checkout has no token-budget micro-batches")
        rows = ids.shape[0]
        rollout = RolloutBatch(input_ids=ids, response_mask=mask, rollout_logprobs=old_logprobs,
                               rewards=torch.zeros(rows), group_index=torch.arange(rows),
                               truncated=torch.zeros(rows, dtype=torch.bool))
        micro_batches = make_micro_batches(rollout, torch.arange(rows), micro_batch_size=size, loss_mask=mask,
                                           old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=None,
                                           max_tokens_per_micro_batch=max_tokens_per_micro_batch)
    else:
        micro_batches = [MicroBatch(*parts) for parts in zip(ids.split(size), mask.split(size),
                                                             old_logprobs.split(size), advantages.split(size),
                                                             strict=True)]
    num_tokens = count_valid_tokens(micro_batches)
    knobs = {}
    if logprob_chunk_size is not None:
        if "logprob_chunk_size" not in {f.name for f in dataclasses.fields(LossSettings)}:
            raise SystemExit("--logprob-chunk-size: this checkout has no chunked logprobs")
        knobs["logprob_chunk_size"] = logprob_chunk_size
    loss_settings = LossSettings(temperature=TEMPERATURE, **knobs)
    if timings is not None:  # time the optimizer step apart from the forward and backward
        inner_step = optimizer.step

        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner_step(*args, **kwargs)
            finally:
                timings["optimizer_s"] = time.perf_counter() - start

        optimizer.step = timed_step

    def step() -> None:
        train_step(policy, optimizer, micro_batches, global_num_tokens=num_tokens, vocab_size=vocab_size,
                   settings=loss_settings)

    step.num_micro_batches = len(micro_batches)
    step.padded_tokens = sum(mb.input_ids.numel() for mb in micro_batches)
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
    parser.add_argument("--model", metavar="DIR", help="a real HF model directory or a fetch-model name")
    parser.add_argument("--data", metavar="FILE", help="--model: parquet whose first --batch rows' prompts are used")
    parser.add_argument("--response-tokens", type=int, default=256, help="--model: response tokens per row")
    parser.add_argument("--micro-batch", type=int, default=0, help="--model: rows per micro-batch (0: --batch)")
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=0,
                        help="--model: token-budget micro-batches (megatron_rl; 0: fixed --micro-batch rows)")
    parser.add_argument("--logprob-chunk-size", type=int, default=None, help="--model: output-layer chunk tokens")
    parser.add_argument("--profile", action="store_true", help="--model: where one megatron_rl step's time goes")
    parser.add_argument("--no-hf", action="store_true", help="--model: skip the transformers baseline")
    parser.add_argument("--rounds", type=int, default=2, help="--model: interleaved measurement rounds (best counts)")
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
    if args.model:
        model_mode(args)
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
