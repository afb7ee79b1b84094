"""Peak RSS and time of one policy update on a batch of long prompts and short responses (CPU, fp32):
the output layer and logprobs at the response positions only, in chunks, and token-budget micro-batches,
against a baseline measured in the same run.

    .venv/bin/python bench/response_logprobs.py [--layers 2] [--rows 8] [--micro-batch 2] [--budget 4096]
        [--baseline-src DIR] [--threads 2]

A Qwen2.5-0.5B-shaped model (its widths and 151,936-token vocabulary, tied embeddings; ``--layers``
decoder layers), random weights, Megatron DDP + AdamW, TP=PP=DP=1. The batch: ``--rows`` responses of
20-256 tokens after prompts of 200-1800 tokens (seeded), GRPO advantages of two groups. Each row of the
table is one fresh subprocess that builds the model, runs one update (warm-up) and times a second one
(``train_step`` over all micro-batches + the optimizer step), and reports its peak RSS
(``ru_maxrss``) and its RSS once the model and optimizer exist (the update's own peak is the difference).

Rows: ``baseline`` (``--baseline-src DIR``: a source tree of an earlier version, e.g. ``git archive
<commit> | tar -x -C DIR``, run as it is: logits at every position, fixed micro-batches; without it, this
tree with ``logprob_chunk_size=0``), ``chunked`` (this tree, fixed ``--micro-batch`` rows, chunks of 1024
tokens), ``budget`` (this tree, ``--budget`` tokens per micro-batch, chunks of 1024). Ratios are against
the baseline row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN25_05B_SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
                    "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768,
                    "rope_theta": 1e6, "rms_norm_eps": 1e-6}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> dict:
    """One update in this process as ``spec`` says; returns the figures."""
    import torch
    from transformers import Qwen2Config

    torch.set_num_threads(spec["threads"])
    from megatron_rl.algorithms import broadcast_to_tokens, grpo_advantages
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.optim import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_rl.megatron.parallel import init_parallel, local_world_env
    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step
    from megatron_rl.rollout.base import Rollout
    from megatron_rl.trainer.batch import make_micro_batches, pack_rollouts

    os.environ.update(local_world_env())
    init_parallel(1, 1)
    config = Qwen2Config(num_hidden_layers=spec["layers"], **QWEN25_05B_SHAPE)
    torch.manual_seed(0)
    model = build_gpt_model(config)
    settings = OptimizerSettings(lr=1e-6)
    policy = wrap_ddp(model, settings)
    optimizer = build_optimizer(policy, settings)

    generator = torch.Generator().manual_seed(spec["seed"])
    rows = spec["rows"]
    prompts = [tuple(torch.randint(0, config.vocab_size, (int(n),), generator=generator).tolist())
               for n in torch.randint(200, 1801, (rows,), generator=generator)]
    rollouts = []
    for row, n in enumerate(torch.randint(20, 257, (rows,), generator=generator).tolist()):
        tokens = tuple(torch.randint(0, config.vocab_size, (n,), generator=generator).tolist())
        rollouts.append(Rollout(row, 0, tokens, "", (-1.0,) * n, "stop"))
    rewards = torch.rand(rows, generator=generator).tolist()
    batch = pack_rollouts(prompts, rollouts, rewards, pad_id=0)
    advantages = broadcast_to_tokens(grpo_advantages(batch.rewards, torch.arange(rows) // max(rows // 2, 1)),
                                     batch.response_mask)
    extra = {"max_tokens_per_micro_batch": spec["budget"]} if spec["budget"] else {}
    micro = make_micro_batches(batch, torch.arange(rows), micro_batch_size=spec["micro_batch"],
                               loss_mask=batch.response_mask, old_logprobs=None, advantages=advantages,
                               ref_logprobs=None, **extra)
    loss_fields = {f.name for f in dataclasses.fields(LossSettings)}
    loss_kwargs = {"kl_coef": 0.0, "entropy_coef": 0.001, "temperature": 1.0}
    if "logprob_chunk_size" in loss_fields:
        loss_kwargs["logprob_chunk_size"] = spec["chunk"]
    loss = LossSettings(**loss_kwargs)
    num_tokens = count_valid_tokens(micro)
    setup_rss = rss_bytes()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        result = train_step(policy, optimizer, micro, global_num_tokens=num_tokens, vocab_size=config.vocab_size,
                            settings=loss)
        times.append(time.perf_counter() - start)
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
            "setup_rss_gib": setup_rss / 2**30, "update_s": times[-1], "loss": result["loss"],
            "micro_batches": len(micro), "padded_tokens": sum(mb.input_ids.numel() for mb in micro),
            "response_tokens": int(batch.response_mask.sum()), "batch_shape": list(batch.input_ids.shape)}


def run(spec: dict, src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], cwd=src,
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    common = {"layers": args.layers, "rows": args.rows, "threads": args.threads, "seed": args.seed,
              "micro_batch": args.micro_batch}
    specs = [
        ({"name": "baseline", "budget": 0, "chunk": 0, **common}, args.baseline_src or REPO),
        ({"name": "chunked", "budget": 0, "chunk": 1024, **common}, REPO),
        ({"name": "budget", "budget": args.budget, "chunk": 1024, **common}, REPO),
    ]
    results = {}
    for spec, src in specs:
        results[spec["name"]] = run(spec, src)
        figures = results[spec["name"]]
        base = results["baseline"]
        print(f"{spec['name']:>8} ({src}): peak RSS {figures['peak_rss_gib']:.2f} GiB "
              f"(update {figures['peak_rss_gib'] - figures['setup_rss_gib']:.2f} GiB above the "
              f"{figures['setup_rss_gib']:.2f} GiB after setup), update {figures['update_s']:.2f} s, "
              f"{figures['micro_batches']} micro-batches, {figures['padded_tokens']} padded tokens "
              f"(x{figures['peak_rss_gib'] / base['peak_rss_gib']:.2f} peak RSS, "
              f"x{figures['update_s'] / base['update_s']:.2f} time vs baseline)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
