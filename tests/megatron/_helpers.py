"""Shared by the Megatron tests and their worker processes: the fixed batch, HF/Megatron forwards."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

# A vocabulary larger than the tokenizer and not a multiple of 128, so Megatron pads it
# (1030 -> 1152 at TP=1, 1280 at TP=2) and the padded logits must be ignored.
VOCAB_SIZE = 1030
TEMPERATURE = 0.7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_batch(vocab_size: int = VOCAB_SIZE, batch: int = 2, seq: int = 12) -> torch.Tensor:
    """Token ids (B, T), the same in every process."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def load_hf_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def megatron_logprobs(model_dir: str | Path, info) -> tuple[torch.Tensor, torch.Tensor]:
    """Build this rank's Megatron stage (``info``: a ParallelInfo), load the HF weights through
    checkpoint/qwen2.py, run :func:`fixed_batch` through the forward-only schedule (two micro-batches);
    return (logprobs, entropy) of the next tokens, (B, T-1), at :data:`TEMPERATURE`, on every rank."""
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.model import build_gpt_model

    hf_config = AutoConfig.from_pretrained(model_dir)
    first, last = info.pp_rank == 0, info.pp_rank == info.pp_size - 1
    model = build_gpt_model(hf_config, tp_size=info.tp_size, pp_size=info.pp_size, pre_process=first,
                            post_process=last)
    load_hf_into_model(model, load_hf_state(model_dir), hf_config, tp_rank=info.tp_rank, tp_size=info.tp_size,
                       pp_rank=info.pp_rank, pp_size=info.pp_size)
    model.eval()
    ids = fixed_batch(hf_config.vocab_size)
    result = forward_logprobs(model, ids, vocab_size=hf_config.vocab_size, temperature=TEMPERATURE,
                              micro_batch_size=1, with_entropy=True)
    return result.logprobs, result.entropy


def set_dist_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))


def spread_weights(model_dir: str | Path, seed: int = 0) -> None:
    """Rewrite ``model.safetensors`` with larger random weights (HF's init gives near-uniform logits,
    which would hide layout errors): linear std 1/sqrt(fan_in), embedding std 0.3, norms 1 + 0.1 N(0,1),
    biases 0.1 N(0,1). The logits then have a standard deviation of a few nats."""
    from safetensors.torch import save_file

    state = load_hf_state(model_dir)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in sorted(state.items()):
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        if "norm" in name:
            value = 1 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = 0.3 * noise
        else:
            value = noise / tensor.shape[1] ** 0.5
        out[name] = value.to(tensor.dtype).contiguous()
    save_file(out, str(Path(model_dir) / "model.safetensors"), metadata={"format": "pt"})


def megatron_logprob_grads(model_dir: str | Path, info) -> dict[str, torch.Tensor]:
    """Gradients of ``sum(logprobs) + 0.1 * sum(entropy)`` of :func:`fixed_batch` w.r.t. this rank's
    parameters (PP=1; a direct forward, not the schedule), keyed by Megatron name."""
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.logprobs import vocab_parallel_logprobs
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import tensor_parallel_group

    assert info.pp_size == 1, "PP=1 only"
    hf_config = AutoConfig.from_pretrained(model_dir)
    model = build_gpt_model(hf_config, tp_size=info.tp_size)
    load_hf_into_model(model, load_hf_state(model_dir), hf_config, tp_rank=info.tp_rank, tp_size=info.tp_size)
    ids = fixed_batch(hf_config.vocab_size)
    logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    result = vocab_parallel_logprobs(logits[:, :-1], ids[:, 1:], vocab_size=hf_config.vocab_size,
                                     temperature=TEMPERATURE, tp_group=tensor_parallel_group(), with_entropy=True)
    (result.logprobs.sum() + 0.1 * result.entropy.sum()).backward()
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}


TRAIN_LR = 1e-5  # small enough that 2 Adam steps leave most tokens inside the PPO clip range
TRAIN_BATCH, TRAIN_SEQ = 4, 12


def train_batch(vocab_size: int = VOCAB_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, T), response_mask (B, T-1), advantages (B, T-1)) of the training tests: responses
    start at target position 4 and have different lengths; one advantage per sequence, both signs."""
    ids = fixed_batch(vocab_size, batch=TRAIN_BATCH, seq=TRAIN_SEQ)
    mask = torch.zeros(TRAIN_BATCH, TRAIN_SEQ - 1, dtype=torch.bool)
    for row, end in enumerate((9, 11, 11, 7)):
        mask[row, 4:end] = True
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(TRAIN_BATCH, TRAIN_SEQ - 1).clone()
    return ids, mask, advantages


def build_policy_and_reference(model_dir: str | Path, info, *, lr: float = TRAIN_LR,
                               use_distributed_optimizer: bool = False, clip_grad: float = 1.0):
    """This rank's DDP-wrapped policy, its optimizer and the frozen reference, all loaded with the HF
    weights through checkpoint/qwen2.py."""
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.optim import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_rl.megatron.reference import freeze_reference

    hf_config = AutoConfig.from_pretrained(model_dir)
    state = load_hf_state(model_dir)

    def build():
        model = build_gpt_model(hf_config, tp_size=info.tp_size, pp_size=info.pp_size, pre_process=info.pp_rank == 0,
                                post_process=info.pp_rank == info.pp_size - 1)
        load_hf_into_model(model, state, hf_config, tp_rank=info.tp_rank, tp_size=info.tp_size, pp_rank=info.pp_rank,
                           pp_size=info.pp_size)
        return model

    settings = OptimizerSettings(lr=lr, use_distributed_optimizer=use_distributed_optimizer, clip_grad=clip_grad)
    policy = wrap_ddp(build(), settings)
    return policy, build_optimizer(policy, settings), freeze_reference(build()), hf_config


MIXED_PROMPTS = (3, 9, 5, 12, 4, 7, 2, 10)  # prompt tokens per row
MIXED_RESPONSES = (6, 2, 9, 3, 1, 8, 5, 4)  # response tokens per row: rows of 5..15 tokens, T = 15


def mixed_length_batch(vocab_size: int = VOCAB_SIZE):
    """(RolloutBatch, per-token advantages (N, T-1)) of 8 rollouts of mixed lengths (two groups of 4,
    rewards of both signs), packed as the trainer packs them: the token-budget micro-batch tests' data."""
    from megatron_rl.algorithms import broadcast_to_tokens, grpo_advantages
    from megatron_rl.rollout.base import Rollout
    from megatron_rl.trainer.batch import pack_rollouts

    generator = torch.Generator().manual_seed(99)
    prompts = [tuple(torch.randint(0, vocab_size, (n,), generator=generator).tolist()) for n in MIXED_PROMPTS]
    rollouts = []
    for row, n in enumerate(MIXED_RESPONSES):
        tokens = tuple(torch.randint(0, vocab_size, (n,), generator=generator).tolist())
        rollouts.append(Rollout(row, 0, tokens, "", (-1.0,) * n, "stop"))
    rewards = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25]
    batch = pack_rollouts(prompts, rollouts, rewards, pad_id=0)
    advantages = grpo_advantages(batch.rewards, torch.arange(8) // 4)
    return batch, broadcast_to_tokens(advantages, batch.response_mask)


BUDGET_CLIP = 1e9  # gradient clipping that never fires: main_grad keeps the raw gradients, grad_norm is reported


def token_budget_step(model_dir: str | Path, info, *, max_tokens_per_micro_batch: int,
                      loss_agg: str = "token-mean", micro_batch_size: int = 2) -> dict:
    """One PPO train step on :func:`mixed_length_batch` (fresh models with the HF weights): reference
    logprobs by forward_logprobs, old logprobs = those + 0.3 N(0, 1) (ratios off 1, some clipped), row 2
    left out of the loss (as overlong filtering does), KL and entropy terms on, fixed micro-batches
    (``max_tokens_per_micro_batch`` 0: ``micro_batch_size`` rows each) or token-budget micro-batches,
    logprob chunks of 4 tokens.

    Returns ``{"metrics", "grads" (this rank's main_grad by Megatron name, before the optimizer step's
    update; clipping never fires), "ref_logprobs" (B, T-1), "padded_tokens", "shapes" (b, T) per micro-batch}``."""
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.optim import unwrap_ddp
    from megatron_rl.megatron.train_step import LossSettings, count_valid_sequences, count_valid_tokens, train_step
    from megatron_rl.trainer.batch import make_micro_batches, padded_tokens

    policy, optimizer, reference, config = build_policy_and_reference(model_dir, info, clip_grad=BUDGET_CLIP)
    batch, advantages = mixed_length_batch(config.vocab_size)
    ref = forward_logprobs(reference, batch.input_ids, vocab_size=config.vocab_size, temperature=TEMPERATURE,
                           micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                           mask=batch.response_mask, chunk_size=4).logprobs
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    old = ref + 0.3 * noise * batch.response_mask
    loss_mask = batch.response_mask.clone()
    loss_mask[2] = False
    micro = make_micro_batches(batch, torch.arange(len(batch)), micro_batch_size=micro_batch_size, loss_mask=loss_mask,
                               old_logprobs=old, advantages=advantages, ref_logprobs=ref,
                               max_tokens_per_micro_batch=max_tokens_per_micro_batch)
    settings = LossSettings(kl_coef=0.01, entropy_coef=0.01, temperature=TEMPERATURE, loss_agg=loss_agg,
                            loss_agg_constant=batch.input_ids.shape[1] - 1, logprob_chunk_size=4)
    metrics = train_step(policy, optimizer, micro, global_num_tokens=count_valid_tokens(micro),
                         global_num_seqs=count_valid_sequences(micro), vocab_size=config.vocab_size, settings=settings)
    grads = {name: param.main_grad.detach().clone() for name, param in unwrap_ddp(policy).named_parameters()}
    return {"metrics": metrics, "grads": grads, "ref_logprobs": ref, "padded_tokens": padded_tokens(micro),
            "shapes": [tuple(mb.input_ids.shape) for mb in micro]}


def run_training(model_dir: str | Path, info, *, num_steps: int, lr: float = TRAIN_LR, kl_coef: float = 1e-3,
                 use_distributed_optimizer: bool = False, save_to: Path | None = None, save_after: int = 1,
                 load_from: Path | None = None) -> dict:
    """``num_steps`` train steps on :func:`train_batch` (micro-batches of one sequence; at DP=2 each rank
    takes half the rows). old_logprobs = the reference logprobs (the step-0 policy), KL to the reference.
    ``save_to``: save a distributed checkpoint after step ``save_after``; ``load_from``: resume from one
    before the first step.

    Returns ``{"metrics": [per-step dict], "logprobs": (B, T-1) after training, "params": this rank's
    Megatron-named parameters after training, "num_tokens", "iteration" (loaded, or None)}``."""
    from megatron_rl.checkpoint.distributed import load_checkpoint, save_checkpoint
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.optim import unwrap_ddp
    from megatron_rl.megatron.reference import check_reference_matches_policy
    from megatron_rl.megatron.train_step import LossSettings, MicroBatch, count_valid_tokens, train_step

    policy, optimizer, reference, hf_config = build_policy_and_reference(
        model_dir, info, lr=lr, use_distributed_optimizer=use_distributed_optimizer)
    vocab = hf_config.vocab_size
    ids, mask, advantages = train_batch(vocab)
    if load_from is None:
        check_reference_matches_policy(policy, reference, ids, vocab_size=vocab, temperature=TEMPERATURE,
                                       micro_batch_size=1)
        iteration = None
    else:
        iteration = load_checkpoint(load_from, policy, optimizer)
    # As the trainer computes them: at the response positions, in the update's micro-batches, so that the
    # step-0 ratios are exactly 1 (the same output-layer GEMMs; a GEMM's last bits depend on its row count).
    ref_logprobs = forward_logprobs(reference, ids, vocab_size=vocab, temperature=TEMPERATURE, micro_batch_size=1,
                                    mask=mask).logprobs
    rows = range(info.dp_rank * TRAIN_BATCH // info.dp_size, (info.dp_rank + 1) * TRAIN_BATCH // info.dp_size)
    micro_batches = [MicroBatch(ids[r:r + 1], mask[r:r + 1], ref_logprobs[r:r + 1], advantages[r:r + 1],
                                ref_logprobs[r:r + 1]) for r in rows]
    num_tokens = count_valid_tokens(micro_batches)
    settings = LossSettings(kl_coef=kl_coef, temperature=TEMPERATURE)
    metrics = []
    for step in range(1, num_steps + 1):
        metrics.append(train_step(policy, optimizer, micro_batches, global_num_tokens=num_tokens, vocab_size=vocab,
                                  settings=settings))
        if save_to is not None and step == save_after:
            save_checkpoint(save_to, policy, optimizer, iteration=step)
    model = unwrap_ddp(policy)
    logprobs = forward_logprobs(model, ids, vocab_size=vocab, temperature=TEMPERATURE, micro_batch_size=1).logprobs
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"metrics": metrics, "logprobs": logprobs, "params": params, "num_tokens": num_tokens,
            "iteration": iteration}


def launch_ranks(worker: Path, args: list[str], out_dir: Path, world_size: int, timeout_s: float) -> list[dict]:
    """Run ``worker`` in ``world_size`` processes (env:// rendezvous, gloo, one thread each) and return
    each rank's OUT_DIR/rank{r}.pt. Raises RuntimeError when a rank fails or they do not all finish
    within ``timeout_s`` (every worker is killed then)."""
    import subprocess
    import sys
    import time

    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, str(worker), str(out_dir), *args], env=env,
                                      cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(0.1, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"worker ranks did not finish within {timeout_s} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise RuntimeError(f"rank {rank} exited with {proc.returncode}:\n{output[-4000:]}")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
