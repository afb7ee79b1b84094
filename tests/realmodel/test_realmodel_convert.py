"""The real model through the HF <-> Megatron converters: bit-exact round trips at the layouts its
9 heads / 3 KV heads allow (TP=1 x PP=2, TP=3), and TP=2 refused with a message naming both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_rl.checkpoint.megatron_io import CheckpointReader


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (3, 1)], ids=["tp1-pp2", "tp3-pp1"])
def test_round_trip_is_bit_exact(real_model_dir: Path, tmp_path: Path, tp: int, pp: int) -> None:
    result = hf_to_megatron(real_model_dir, tmp_path / "mcore", tp=tp, pp=pp)
    reader = CheckpointReader(tmp_path / "mcore")
    assert reader.tensor_shapes()["embedding.word_embeddings.weight"] == (49152, 576)  # 49,152 = 128 x 3 x 128
    assert "output_layer.weight" not in reader.tensor_shapes()  # tied
    megatron_to_hf(tmp_path / "mcore", tmp_path / "hf")
    original = load_file(str(real_model_dir / "model.safetensors"))
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert result.num_tensors == len(original) == len(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "hf" / name).read_bytes() == (real_model_dir / name).read_bytes(), name


def test_tp2_is_refused_naming_heads_and_kv_heads(real_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as caught:
        hf_to_megatron(real_model_dir, tmp_path / "mcore", tp=2)
    message = str(caught.value)
    print(message)
    assert "num_attention_heads=9 is not divisible by tp_size=2" in message
    assert "9 attention heads and 3 KV heads: tp_size must be one of [1, 3]" in message
    assert not (tmp_path / "mcore").exists()
