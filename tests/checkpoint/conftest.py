"""Fixtures for the converter tests: tiny HF checkpoints (spread-out weights, vocab needing padding)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "megatron"))

from _helpers import VOCAB_SIZE, spread_weights


def _llama(path: Path, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rl.testing import tiny_model

    tiny_model(path)  # for its tokenizer files; the weights and config are replaced below
    (path / "model.safetensors").unlink()
    values = {"vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    values.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**values)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """name -> tiny HF model directory (vocab 1030: padded to 1152 / 1280 / 1536 at TP 1 / 2 / 4).

    qwen2_tied, qwen2_untied: 4 heads, 2 KV groups, q/k/v bias; qwen2_gqa8: 8 heads of dim 32 in 4 KV
    groups (TP=4 gives each rank one group); qwen2_kv1: tied, 4 heads sharing 1 KV head (TP>1 splits
    that group); llama: untied, no bias."""
    from megatron_rl.testing import tiny_model

    root = tmp_path_factory.mktemp("hf")
    models = {
        "qwen2_tied": tiny_model(root / "qwen2_tied", vocab_size=VOCAB_SIZE, tie_word_embeddings=True),
        "qwen2_untied": tiny_model(root / "qwen2_untied", vocab_size=VOCAB_SIZE, tie_word_embeddings=False),
        "qwen2_gqa8": tiny_model(root / "qwen2_gqa8", vocab_size=VOCAB_SIZE, tie_word_embeddings=False,
                                 hidden_size=256, num_attention_heads=8, num_key_value_heads=4),
        "qwen2_kv1": tiny_model(root / "qwen2_kv1", vocab_size=VOCAB_SIZE, num_key_value_heads=1),
        "llama": _llama(root / "llama"),
    }
    for path in models.values():
        spread_weights(path)
    return models
