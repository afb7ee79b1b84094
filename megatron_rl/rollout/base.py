"""What every rollout engine takes and returns: sampling knobs, one sampled response, the interface.

The trainer sees only :class:`RolloutEngine`; the vLLM engine (``vllm_engine.py``) is the one
used for training, and the transformers engine (``hf_engine.py``) is a slow fallback for
machines where vLLM cannot be installed. Both return the same :class:`Rollout` records::

    engine.load_weights(hf_named_tensors)          # after every policy update
    rollouts = engine.generate(prompt_token_ids, SamplingConfig(n=8, temperature=1.0))
    rollouts[i * 8 + j]                            # prompt i, sample j
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from megatron_rl.validation import check_choice, check_range

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled. Generation always stops at the model's EOS tokens (those of
    its ``generation_config.json``, e.g. ``<|im_end|>`` and ``<|endoftext|>`` for Qwen2.5) or
    at ``max_tokens``."""

    n: int = 1
    """Responses sampled per prompt (the GRPO group size)."""

    temperature: float = 1.0
    """Softmax temperature. 0 means greedy decoding (top_p/top_k are then ignored). The
    returned logprobs are those of the distribution actually sampled from, log_softmax(logits /
    temperature) restricted to the top_k/top_p set, so the trainer must use the same value;
    at temperature 0 they are the untempered log_softmax(logits)."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in
    (0, 1]; 1 keeps every token."""

    top_k: int = -1
    """Keep only the top_k most likely tokens; -1 keeps every token, top_k=1 is greedy."""

    max_tokens: int = 1024
    """Most response tokens per sample (EOS included); a response cut here has
    finish_reason 'length'."""

    seed: int | None = None
    """Seed of the sampling noise. Sample j of prompt i uses seed + i * n + j, so the same
    seed, prompts and weights give the same rollouts. None draws fresh noise each call."""

    def __post_init__(self) -> None:
        check_range("sampling.n", self.n, low=1, integer=True)
        check_range("sampling.temperature", self.temperature, low=0.0)
        check_range("sampling.top_p", self.top_p, low=0.0, low_inclusive=False, high=1.0)
        check_range("sampling.top_k", self.top_k, low=-1, integer=True)
        if self.top_k == 0:
            raise ValueError("sampling.top_k=0 is not allowed; use -1 (keep every token) or a positive integer")
        check_range("sampling.max_tokens", self.max_tokens, low=1, integer=True)
        if self.seed is not None:
            check_range("sampling.seed", self.seed, low=0, integer=True)

    @property
    def greedy(self) -> bool:
        """True when decoding picks the most likely token (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    def sample_seed(self, prompt_index: int, sample_index: int) -> int | None:
        """The seed of one sample (see ``seed``), or None."""
        return None if self.seed is None else self.seed + prompt_index * self.n + sample_index


@dataclass(frozen=True)
class Rollout:
    """One sampled response to one prompt. ``len(token_ids) == len(logprobs)``."""

    prompt_index: int
    """Index of the prompt in the list given to ``generate``."""

    sample_index: int
    """Which of the ``n`` samples of that prompt (0 .. n-1)."""

    token_ids: tuple[int, ...]
    """Response token ids, without the prompt; ends with the EOS token when finish_reason is
    'stop' (so the policy learns to stop)."""

    text: str
    """The response decoded without special tokens (what rewards score)."""

    logprobs: tuple[float, ...]
    """Per-token logprob of each sampled token under the sampling distribution (see
    ``SamplingConfig.temperature``), one per entry of ``token_ids``."""

    finish_reason: Literal["stop", "length"]
    """'stop': the model emitted an EOS token; 'length': cut at max_tokens."""

    def __post_init__(self) -> None:
        check_choice("rollout.finish_reason", self.finish_reason, FINISH_REASONS)
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"rollout.logprobs has {len(self.logprobs)} entries for {len(self.token_ids)} token_ids; "
                "they must match one to one"
            )
        bad = [lp for lp in self.logprobs if math.isnan(lp) or lp > 0.0]
        if bad:
            raise ValueError(f"rollout.logprobs={bad[:3]!r} must be <= 0 and not NaN")


@runtime_checkable
class RolloutEngine(Protocol):
    """A generator the trainer can sample from and push new weights into."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Sample ``sampling.n`` responses per prompt; return them ordered by prompt, then sample
        (``rollouts[i * n + j]`` is sample j of prompt i)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights in place with full, Hugging Face-named tensors (all of
        them or a subset, e.g. one bucket); later ``generate`` calls use the new weights."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory while the trainer runs (a no-op where unsupported)."""
        ...

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Undo ``sleep`` before the next ``generate`` (a no-op where unsupported). ``tags`` names the
        parts to wake (``"weights"``, ``"kv_cache"``; None: all): the trainer wakes the weights, pushes
        new ones into them, then wakes the KV cache."""
        ...

    def close(self) -> None:
        """Release the engine; it cannot be used afterwards."""
        ...


def check_prompts(prompt_token_ids: list[list[int]], vocab_size: int) -> None:
    """Raise ValueError for an empty prompt list, an empty prompt or an id outside the vocabulary."""
    if not prompt_token_ids:
        raise ValueError("prompt_token_ids is empty; pass at least one prompt")
    for index, ids in enumerate(prompt_token_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt_token_ids[{index}] is empty; every prompt needs at least one token")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids[{index}] has ids {bad[:5]!r} outside [0, {vocab_size})")
