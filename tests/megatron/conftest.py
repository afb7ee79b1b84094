"""Fixtures for the Megatron tests: tiny HF checkpoints with spread-out weights, a one-rank gloo world."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _helpers import VOCAB_SIZE, free_port, set_dist_env, spread_weights


@pytest.fixture(scope="session")
def qwen2_dirs(tmp_path_factory) -> dict[bool, Path]:
    """tied_word_embeddings -> a tiny Qwen2 checkpoint (vocab 1030, so Megatron pads it)."""
    from megatron_rl.testing import tiny_model

    dirs = {}
    for tied in (True, False):
        path = tiny_model(tmp_path_factory.mktemp(f"qwen2_tied{int(tied)}"), vocab_size=VOCAB_SIZE,
                          tie_word_embeddings=tied)
        spread_weights(path)
        dirs[tied] = path
    return dirs


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny untied Llama checkpoint with the same shape as the Qwen2 one (no q/k/v bias)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    spread_weights(path)
    return path


@pytest.fixture(scope="module")
def world1():
    """A one-process gloo world with Megatron TP=PP=1 in this (pytest) process; torn down afterwards.

    Note: this applies the CPU shims to the pytest process (they stay for the session; they only
    replace CUDA entry points that would raise on this machine anyway)."""
    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    set_dist_env(0, 1, free_port())
    try:
        yield init_parallel(tp=1, pp=1)
    finally:
        destroy_parallel()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
