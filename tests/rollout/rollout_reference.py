"""Reference computations for the rollout engine tests: a teacher-forced transformers forward,
checkpoint tensors to push, and EOS-heavy weights (a uniquely named module, so that importing it
never picks up another test folder's helpers)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

LOGPROB_ATOL = 1e-4
"""Engine logprobs vs a teacher-forced transformers forward, both fp32 (measured: <= 1e-6)."""

EOS_ID = 1023  # <|im_end|>, the tiny tokenizer's eos (its generation_config adds <|endoftext|> = 1021)
STOP_IDS = (1021, 1023)


PROMPTS = [[317, 282, 643, 520, 830, 30, 198], [56, 78, 84, 264], [100, 200, 300, 400, 500, 600, 700, 800, 900]]
"""Prompt token ids every engine test generates from (lengths 7, 4, 9)."""


def checkpoint_weights(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    """All tensors of a checkpoint, HF-named, as the trainer's weight sync would send them."""
    return sorted(load_file(str(model_dir / "model.safetensors")).items())


def hf_model(model_dir: Path, weights: list[tuple[str, torch.Tensor]] | None = None) -> torch.nn.Module:
    """The fp32 transformers model of ``model_dir``, optionally with ``weights`` loaded over it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if weights is not None:
        missing, unexpected = model.load_state_dict(dict(weights), strict=False)
        assert not unexpected, unexpected
    return model


@torch.no_grad()
def teacher_forced_logprobs(
    model: torch.nn.Module,
    prompt: list[int],
    response: tuple[int, ...],
    temperature: float,
    top_k: int = -1,
    top_p: float = 1.0,
) -> torch.Tensor:
    """log_softmax(logits / T) at each response token, from one forward over prompt + response,
    renormalised over the top_k most likely tokens and then the top_p nucleus (the smallest set
    whose probability reaches top_p), which is the distribution the engines sample from.

    Temperature 0 (greedy) means T = 1: greedy engines return the untempered logprobs.
    Returns (len(response),) float32.
    """
    ids = torch.tensor([list(prompt) + list(response)])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (R, V): position t predicts token t+1
    logits = logits / (temperature if temperature > 0 else 1.0)
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    logprobs = logits.log_softmax(dim=-1)
    return logprobs.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def max_logprob_error(
    model: torch.nn.Module, prompts: list[list[int]], rollouts, temperature: float, **filters
) -> float:
    """Largest |engine logprob - teacher-forced logprob| over every token of every rollout
    (``filters``: top_k / top_p as in :func:`teacher_forced_logprobs`)."""
    worst = 0.0
    for rollout in rollouts:
        prompt = prompts[rollout.prompt_index]
        expected = teacher_forced_logprobs(model, prompt, rollout.token_ids, temperature, **filters)
        got = torch.tensor(rollout.logprobs)
        worst = max(worst, (got - expected).abs().max().item())
    return worst


@torch.no_grad()
def eos_heavy_weights(model_dir: Path, eos_logit: float = 5.8) -> list[tuple[str, torch.Tensor]]:
    """Weights under which every position has the same next-token distribution: EOS with logit
    ``eos_logit``, every other token logit 0, so a response stops after ~4 tokens on average.

    How: zero every (tied) embedding row, so a non-EOS input token contributes nothing and
    attention only sees the q/k/v biases; give layer 0 a nonzero v bias, so every position gets
    the same nonzero hidden state h; then set the EOS row to eos_logit * h / |h|^2, so its logit
    is h . E_eos = eos_logit while every other row (zero) gives 0. Prompts must not contain EOS.
    p(EOS) = e^5.8 / (e^5.8 + 1023) ~ 0.25 per step (<|endoftext|>, also a stop id, ~1e-3).
    Returns the changed tensors plus the rest of layer 0's q/k/v (vLLM fuses them: a push must
    carry the whole fused layer).
    """
    model = hf_model(model_dir)
    attention = model.model.layers[0].self_attn
    attention.v_proj.bias.copy_(torch.randn(attention.v_proj.bias.shape, generator=torch.Generator().manual_seed(0)))
    embed = model.model.embed_tokens.weight
    embed.zero_()
    hidden = model.model(torch.tensor([[5, 6, 7]])).last_hidden_state[0, -1]  # (H,), after the final norm
    assert hidden.norm() > 1e-3, hidden.norm()
    embed[EOS_ID] = eos_logit * hidden / hidden.dot(hidden)
    names = ["model.embed_tokens.weight"] + [
        f"model.layers.0.self_attn.{proj}_proj.{kind}" for proj in "qkv" for kind in ("weight", "bias")
    ]
    state = model.state_dict()
    return [(name, state[name].detach().clone()) for name in names]


def check_renormalised_logprobs(engine, reference, prompts, *, top_k: int, top_p: float) -> None:
    """An engine's sampled logprobs under top-k/top-p are those of the renormalised filtered
    distribution (and differ from the unfiltered ones), for any RolloutEngine."""
    from megatron_rl.rollout import SamplingConfig

    sampling = SamplingConfig(n=2, temperature=0.8, top_k=top_k, top_p=top_p, max_tokens=8, seed=3)
    rollouts = engine.generate(prompts, sampling)
    error = max_logprob_error(reference, prompts, rollouts, 0.8, top_k=top_k, top_p=top_p)
    print(f"{type(engine).__name__} top_k={top_k} top_p={top_p}: max |logprob diff| = {error:.2e}")
    assert error < LOGPROB_ATOL
    unfiltered = max_logprob_error(reference, prompts, rollouts, 0.8)
    assert unfiltered > 0.01  # the filter really changed the logprobs
