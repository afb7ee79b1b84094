"""Training throughput of one PPO policy step on CPU: megatron_rl (Megatron-Core, TP=1, DDP + Megatron
AdamW) against plain transformers ``Qwen2ForCausalLM`` + ``torch.optim.AdamW``, same weights, same batch,
same loss (token-mean PPO clip loss on temperature-scaled logprobs), measured in the same run.

    .venv/bin/python bench/train_step.py [--threads 2] [--batch 4] [--seq 256] [--steps 5]

Prints tokens/s (all B*T tokens of the batch through forward + backward + optimizer step) for both and
their ratio (megatron_rl / transformers). One process, gloo world of 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

# ~20M parameters with the 1024-token tokenizer (tied embeddings).
MODEL_SHAPE = {"hidden_size": 512, "num_hidden_layers": 7, "intermediate_size": 1408, "num_attention_heads": 8,
               "num_key_value_heads": 2}
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


def time_steps(step, num_steps: int, warmup: int = 2) -> float:
    """Median seconds of ``step()`` over ``num_steps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        step()
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


def megatron_step_fn(model_dir: str, batch: dict[str, torch.Tensor]):
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.optim import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_rl.megatron.parallel import init_parallel
    from megatron_rl.megatron.train_step import LossSettings, MicroBatch, count_valid_tokens, train_step

    info = init_parallel(tp=1, pp=1)
    hf_config = AutoConfig.from_pretrained(model_dir)
    from safetensors.torch import load_file

    model = build_gpt_model(hf_config)
    load_hf_into_model(model, load_file(os.path.join(model_dir, "model.safetensors")), hf_config, tp_rank=0, tp_size=1)
    settings = OptimizerSettings(lr=LR)
    policy = wrap_ddp(model, settings)
    optimizer = build_optimizer(policy, settings)
    ids, mask, advantages = batch["ids"], batch["mask"], batch["advantages"]
    old_logprobs = forward_logprobs(model, ids, vocab_size=hf_config.vocab_size, temperature=TEMPERATURE).logprobs
    micro_batches = [MicroBatch(ids, mask, old_logprobs, advantages)]
    num_tokens = count_valid_tokens(micro_batches)
    loss_settings = LossSettings(temperature=TEMPERATURE)

    def step() -> None:
        train_step(policy, optimizer, micro_batches, global_num_tokens=num_tokens, vocab_size=hf_config.vocab_size,
                   settings=loss_settings)

    return step, sum(p.numel() for p in model.parameters()), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29512"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")

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
    hf_s, mg_s = min(hf_times), min(mg_times)
    print(f"model: Qwen2 {MODEL_SHAPE}, {hf_params / 1e6:.1f}M params (megatron padded vocab: "
          f"{mg_params / 1e6:.1f}M); batch {args.batch} x {args.seq} = {tokens} tokens; {args.threads} threads; fp32")
    print(f"transformers + torch AdamW : {tokens / hf_s:8.0f} tokens/s  ({hf_s * 1e3:.0f} ms/step)")
    print(f"megatron_rl TP=1           : {tokens / mg_s:8.0f} tokens/s  ({mg_s * 1e3:.0f} ms/step)")
    print(f"ratio megatron_rl / transformers: {hf_s / mg_s:.2f}x")


if __name__ == "__main__":
    main()
