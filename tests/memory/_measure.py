"""Shared by the memory tests and their worker: model shapes, the plan's config, one measured step."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The tiny model's shape (megatron_rl.testing.tiny_model, 2 layers) and Qwen2.5-0.5B's widths (published
# config.json: hidden 896, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151,936, tied) with 1 layer
# instead of 24 so that a step takes seconds: every layer adds the same terms (the tiny model checks the sum).
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
         "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
SHAPES = {
    "tiny": {**QWEN2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1024, "tie_word_embeddings": True},
    "qwen05": {**QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
               "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 151936, "tie_word_embeddings": True},
}
PROMPT, RESPONSE = 24, 40  # tokens per sequence: every response at its full length, as the plan assumes


def write_model(directory: Path, shape: str, **overrides) -> Path:
    """A model directory holding only config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**SHAPES[shape], **overrides}))
    return directory


def run_config(model_dir: Path, *, micro: int, recompute: str = "none", distributed: bool = False,
               chunk: int = 32, extra: tuple[str, ...] = ()):
    """The run config the plan is asked about: ``micro`` sequences of PROMPT + RESPONSE tokens per
    micro-batch, fp32 on CPU, no reference (kl_coef 0)."""
    from megatron_rl.config import load_config

    return load_config(None, [
        f"model.path={model_dir}", f"model.recompute={recompute}", "model.layer_spec=local",
        f"data.max_prompt_length={PROMPT}", f"rollout.max_response_length={RESPONSE}", "data.batch_size=2",
        "rollout.n=4", f"algorithm.micro_batch_size={micro}", f"algorithm.logprob_chunk_size={chunk}",
        "algorithm.kl_coef=0", f"optim.use_distributed_optimizer={str(distributed).lower()}", *extra])


def build(cfg, hf_config, *, seed: int = 0):
    """The policy as the trainer builds it (fp32 on CPU): GPTModel + Megatron DDP + AdamW."""
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.optim import build_optimizer, wrap_ddp

    torch.manual_seed(seed)
    model = build_gpt_model(hf_config, recompute_granularity=cfg.model.recompute,
                            recompute_method=cfg.model.recompute_method,
                            recompute_num_layers=cfg.model.recompute_num_layers, layer_spec="local")
    policy = wrap_ddp(model, cfg.optim)
    return policy, build_optimizer(policy, cfg.optim)


def micro_batches(cfg, hf_config, *, rows: int, seed: int = 1):
    """``rows`` sequences of PROMPT + RESPONSE random tokens cut into the config's micro-batches by the
    trainer's own make_micro_batches."""
    from megatron_rl.trainer.batch import RolloutBatch, make_micro_batches

    generator = torch.Generator().manual_seed(seed)
    width = PROMPT + RESPONSE
    ids = torch.randint(0, hf_config.vocab_size, (rows, width), generator=generator)
    mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    mask[:, PROMPT - 1:] = True
    batch = RolloutBatch(input_ids=ids, response_mask=mask, rollout_logprobs=torch.zeros(rows, width - 1),
                         rewards=torch.linspace(-1, 1, rows), group_index=torch.arange(rows),
                         truncated=torch.zeros(rows, dtype=torch.bool))
    advantages = batch.rewards[:, None].expand_as(mask).contiguous()
    return make_micro_batches(batch, torch.arange(rows), micro_batch_size=cfg.algorithm.micro_batch_size,
                              loss_mask=mask, old_logprobs=None, advantages=advantages, ref_logprobs=None,
                              max_tokens_per_micro_batch=cfg.algorithm.max_tokens_per_micro_batch)


def step(policy, optimizer, cfg, hf_config, batches) -> dict:
    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step

    settings = LossSettings(kl_coef=0.0, entropy_coef=0.001, temperature=0.8,
                            logprob_chunk_size=cfg.algorithm.logprob_chunk_size)
    return train_step(policy, optimizer, batches, global_num_tokens=count_valid_tokens(batches),
                      vocab_size=hf_config.vocab_size, settings=settings)


def measured_state(policy, optimizer) -> dict[str, int]:
    from megatron_rl.memory.measure import gradient_buffer_bytes, optimizer_state_bytes, parameter_bytes

    return {"params": parameter_bytes(policy), "grads": gradient_buffer_bytes(policy),
            "optimizer": optimizer_state_bytes(optimizer, policy)}
