"""The critic's training runs, in this process or as one rank of the multi-process tests (launched like
torchrun would, env:// variables set)::

    python _critic_worker.py OUT_DIR LAYOUTS MODEL_DIR NUM_STEPS

LAYOUTS is a comma-separated list of TPxPP (``2x1,1x2,1x1``; DP is what the world size leaves, and
DP > 1 uses the distributed optimizer). For each layout runs :func:`run_critic` and saves this rank's
ParallelInfo and results to OUT_DIR/rank{RANK}.pt as ``{layout: {...}}``. With 2x1 in LAYOUTS that run
also saves the critic after its first step (OUT_DIR/critic_2x1) and a fresh critic resumes it for one
step at TP=2 (``"resume-2x1"``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CRITIC_LR = 1e-4
CRITIC_MICRO_BATCH = 1  # rows per micro-batch: 4 micro-batches at DP=1, 2 per rank at DP=2
REWARDS = (1.0, -1.0, 0.5, 0.0)


def critic_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (4, 12), response_mask (4, 11), returns (4, 11)) of the critic tests: the training
    tests' batch, each response's return its outcome reward ``REWARDS`` at every one of its tokens (GAE's
    returns at gamma = lam = 1: A_t + V_t = R - V_t + V_t)."""
    from _helpers import train_batch

    from megatron_rl import algorithms

    ids, mask, _advantages = train_batch(vocab_size)
    returns = algorithms.broadcast_to_tokens(torch.tensor(REWARDS), mask)
    return ids, mask, returns


def build_critic_for(model_dir, info, *, lr: float = CRITIC_LR, use_distributed_optimizer: bool = False):
    """This rank's DDP-wrapped critic (the HF trunk, a fresh head), its optimizer, and the HF config."""
    from _helpers import load_hf_state
    from transformers import AutoConfig

    from megatron_rl.megatron.critic import build_critic, load_hf_into_critic
    from megatron_rl.megatron.optim import OptimizerSettings, build_optimizer, wrap_ddp

    hf_config = AutoConfig.from_pretrained(model_dir)
    critic = build_critic(hf_config, tp_size=info.tp_size, pp_size=info.pp_size, pre_process=info.pp_rank == 0,
                          post_process=info.pp_rank == info.pp_size - 1)
    load_hf_into_critic(critic, load_hf_state(model_dir), hf_config, tp_rank=info.tp_rank, tp_size=info.tp_size,
                        pp_rank=info.pp_rank, pp_size=info.pp_size)
    settings = OptimizerSettings(lr=lr, use_distributed_optimizer=use_distributed_optimizer)
    critic = wrap_ddp(critic, settings)
    return critic, build_optimizer(critic, settings), hf_config


def run_critic(model_dir, info, *, num_steps: int, cliprange_value: float | None = 0.5,
               use_distributed_optimizer: bool = False, save_to: Path | None = None,
               load_from: Path | None = None) -> dict:
    """Values of :func:`critic_batch` at the start, ``num_steps`` clipped value-loss steps (old values: the
    start's; this DP rank's rows), values after. ``save_to``: save the critic after step 1; ``load_from``:
    load a saved critic before the first step (the old values then stay the fresh critic's).

    Returns ``{"values0", "metrics": [per step], "values", "params" (Megatron names), "num_tokens",
    "iteration" (loaded, or None)}``."""
    from megatron_rl.megatron.critic import (
        ValueLossSettings,
        critic_micro_batches,
        critic_train_step,
        forward_values,
        load_critic_checkpoint,
        save_critic_checkpoint,
    )
    from megatron_rl.megatron.optim import unwrap_ddp
    from megatron_rl.megatron.train_step import count_valid_tokens

    critic, optimizer, hf_config = build_critic_for(model_dir, info,
                                                    use_distributed_optimizer=use_distributed_optimizer)
    ids, mask, returns = critic_batch(hf_config.vocab_size)
    values0 = forward_values(critic, ids, mask=mask, micro_batch_size=2)
    iteration = None if load_from is None else load_critic_checkpoint(load_from, critic, optimizer)
    num_rows = ids.shape[0]
    rows = torch.arange(info.dp_rank * num_rows // info.dp_size, (info.dp_rank + 1) * num_rows // info.dp_size)
    micro = critic_micro_batches(ids, rows, loss_mask=mask, old_values=values0, returns=returns,
                                 micro_batch_size=CRITIC_MICRO_BATCH)
    num_tokens = count_valid_tokens(micro)
    settings = ValueLossSettings(cliprange_value=cliprange_value)
    metrics = []
    for step in range(1, num_steps + 1):
        metrics.append(critic_train_step(critic, optimizer, micro, global_num_tokens=num_tokens, settings=settings))
        if save_to is not None and step == 1:
            save_critic_checkpoint(save_to, critic, optimizer, iteration=step)
    values = forward_values(critic, ids, mask=mask, micro_batch_size=2)
    params = {name: p.detach().clone() for name, p in unwrap_ddp(critic).named_parameters()}
    return {"values0": values0, "metrics": metrics, "values": values, "params": params, "num_tokens": num_tokens,
            "iteration": iteration}


def main(out_dir: str, layouts: str, model_dir: str, num_steps: int) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel

    results = {}
    try:
        for layout in layouts.split(","):
            tp, pp = (int(n) for n in layout.split("x"))
            info = init_parallel(tp=tp, pp=pp)
            save_to = Path(out_dir) / "critic_2x1" if layout == "2x1" else None
            results[layout] = {"info": info, **run_critic(model_dir, info, num_steps=num_steps, save_to=save_to,
                                                          use_distributed_optimizer=info.dp_size > 1)}
        if "2x1" in results:
            info = init_parallel(tp=2, pp=1)
            results["resume-2x1"] = {"info": info, **run_critic(model_dir, info, num_steps=1,
                                                                load_from=Path(out_dir) / "critic_2x1")}
        torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
