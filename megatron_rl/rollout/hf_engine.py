"""A rollout engine on transformers ``generate``: the fallback where vLLM cannot be installed.

Slow (no paged KV cache, no continuous batching: prompts are generated one at a time, their
``n`` samples as one batch), but it returns the same :class:`~megatron_rl.rollout.base.Rollout`
records as :class:`~megatron_rl.rollout.vllm_engine.VLLMEngine`: the logprobs are taken from
the processed scores (after temperature, top-k and top-p), like vLLM's
``logprobs_mode="processed_logprobs"``. The vLLM engine stays the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from megatron_rl.rollout.base import Rollout, SamplingConfig, check_prompts
from megatron_rl.validation import check_choice

DTYPES = ("float32", "bfloat16", "float16")


class TransformersEngine:
    """:class:`~megatron_rl.rollout.base.RolloutEngine` on ``AutoModelForCausalLM.generate``.

    Args:
        model_dir: Hugging Face checkpoint directory (config, safetensors, tokenizer,
            generation_config.json whose ``eos_token_id`` ends a response).
        dtype: 'float32' (default), 'bfloat16' or 'float16'.
        device: Torch device; None picks 'cuda' when available, else 'cpu'.

    Seeds: with ``SamplingConfig.seed`` set, prompt i's group of n samples is drawn from torch's
    RNG seeded with ``seed + i * n`` (the global RNG state is restored afterwards), so results
    are reproducible but are not the same draws as vLLM's.
    """

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_choice("rollout.dtype", dtype, DTYPES)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                          trust_remote_code=False).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else eos)
        if not self.eos_token_ids:
            raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json or the tokenizer")
        pad = self.model.generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids)
        self.vocab_size = self.model.config.vocab_size
        self._closed = False

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                 on_prompt_done: Callable[[], None] | None = None) -> list[Rollout]:
        """Sample ``sampling.n`` responses per prompt, ordered by prompt then sample; ``on_prompt_done()``
        is called after each prompt's samples (e.g. to advance a progress bar)."""
        self._check_open()
        check_prompts(prompt_token_ids, self.vocab_size)
        rollouts = []
        for prompt_index, ids in enumerate(prompt_token_ids):
            seed = sampling.sample_seed(prompt_index, 0)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                rollouts.extend(self._generate_one(prompt_index, ids, sampling))
            if on_prompt_done is not None:
                on_prompt_done()
        return rollouts

    def _generate_one(self, prompt_index: int, ids: list[int], sampling: SamplingConfig) -> list[Rollout]:
        """The n samples of one prompt, as one batch (no padding needed: they share the prompt)."""
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
        do_sample = sampling.temperature > 0.0
        sampling_kwargs = (
            dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
            if do_sample
            else dict(temperature=None, top_p=None, top_k=None)
        )
        out = self.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=do_sample,
            num_return_sequences=sampling.n,
            max_new_tokens=sampling.max_tokens,
            min_new_tokens=0,
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
            **sampling_kwargs,
        )
        responses = out.sequences[:, prompt.shape[1]:]  # (n, T)
        # scores[t]: (n, vocab) after temperature / top-k / top-p, -inf outside the kept set.
        logprobs = torch.stack(out.scores, dim=1).float().log_softmax(dim=-1)  # (n, T, vocab)
        picked = logprobs.gather(-1, responses.unsqueeze(-1)).squeeze(-1)  # (n, T)
        rollouts = []
        for sample_index in range(sampling.n):
            tokens = responses[sample_index].tolist()
            end = next((t + 1 for t, token in enumerate(tokens) if token in self.eos_token_ids), None)
            finish_reason = "stop" if end is not None else "length"
            tokens = tokens[:end] if end is not None else tokens
            rollouts.append(
                Rollout(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    token_ids=tuple(tokens),
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    logprobs=tuple(picked[sample_index, : len(tokens)].tolist()),
                    finish_reason=finish_reason,
                )
            )
        return rollouts

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into the model in place (a tied ``lm_head.weight`` updates
        the embedding too). Unknown names and shape mismatches raise, naming the tensor."""
        self._check_open()
        state = self.model.state_dict(keep_vars=True)
        count = 0
        for name, tensor in weights:
            if name not in state:
                raise KeyError(f"load_weights: {name!r} is not a parameter of {self.model_dir}")
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(state[name].shape)}"
                )
            state[name].data.copy_(tensor)
            count += 1
        if count == 0:
            raise ValueError("load_weights got no tensors")

    def sleep(self) -> None:
        """No-op: this engine keeps its weights where they are."""
        self._check_open()

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """No-op (see :meth:`sleep`)."""
        self._check_open()

    def close(self) -> None:
        """Drop the model (idempotent)."""
        if not self._closed:
            self._closed = True
            del self.model

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TransformersEngine is closed")
