"""HF <-> Megatron checkpoint directories in one process: bit-exact round trips at every TP/PP layout,
sharded input and output, dtypes, loud and clean failures, the CLI with --verify, RNG state."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import VOCAB_SIZE, load_hf_state
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_rl.checkpoint import convert, qwen2
from megatron_rl.checkpoint.convert import hf_to_megatron, megatron_to_hf, write_hf_checkpoint
from megatron_rl.checkpoint.megatron_io import CheckpointReader
from megatron_rl.megatron.model import GPTShape, padded_vocab_size


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, single file or sharded."""
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        out.update(load_file(str(model_dir / name)))
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def leftovers(parent: Path) -> list[str]:
    """Temporary output directories left in ``parent``."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


LAYOUTS = [("qwen2_tied", 1, 1), ("qwen2_tied", 2, 1), ("qwen2_tied", 1, 2), ("qwen2_tied", 2, 2),
           ("qwen2_untied", 1, 1), ("qwen2_untied", 2, 2), ("qwen2_untied", 2, 1),
           ("qwen2_untied", 4, 1), ("qwen2_gqa8", 4, 1), ("qwen2_gqa8", 4, 2), ("qwen2_kv1", 2, 1),
           ("qwen2_kv1", 4, 2), ("llama", 1, 2), ("llama", 2, 2)]


@pytest.mark.parametrize(("model", "tp", "pp"), LAYOUTS, ids=[f"{m}-tp{t}-pp{p}" for m, t, p in LAYOUTS])
def test_round_trip_is_bit_exact(hf_models, tmp_path, model, tp, pp) -> None:
    src = hf_models[model]
    result = hf_to_megatron(src, tmp_path / "mcore", tp=tp, pp=pp)
    reader = CheckpointReader(tmp_path / "mcore")
    # The vocabulary (1030) is padded for this TP with zero rows.
    rows = padded_vocab_size(VOCAB_SIZE, 128, tp)
    embedding = reader.read("embedding.word_embeddings.weight")
    assert embedding.shape == (rows, 256 if model == "qwen2_gqa8" else 128)
    assert rows > VOCAB_SIZE and not embedding[VOCAB_SIZE:].any()
    assert ("output_layer.weight" in reader.tensor_shapes()) == (model not in ("qwen2_tied", "qwen2_kv1"))
    assert ("decoder.layers.self_attention.linear_qkv.bias" in reader.tensor_shapes()) == model.startswith("qwen2")
    megatron_to_hf(tmp_path / "mcore", tmp_path / "hf")
    original = load_hf_state(src)
    assert result.num_tensors == len(original)
    assert_same_tensors(hf_tensors(tmp_path / "hf"), original)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes(), name


def test_stored_model_is_the_same_at_every_layout(hf_models, tmp_path) -> None:
    """Only the padding differs between TP layouts; the stored q/k/v and gate/up do not depend on TP."""
    src = hf_models["qwen2_gqa8"]
    readers = {}
    for tp, pp in ((1, 1), (4, 2)):
        hf_to_megatron(src, tmp_path / f"{tp}x{pp}", tp=tp, pp=pp)
        readers[tp] = CheckpointReader(tmp_path / f"{tp}x{pp}")
    for key in readers[1].tensor_shapes():
        one, four = readers[1].read(key), readers[4].read(key)
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert (one.shape[0], four.shape[0]) == (1152, 1536)
            four = four[:1152]
        assert torch.equal(one, four), key


@pytest.mark.parametrize("tp", [2, 4])
def test_one_kv_head_is_split_evenly_over_tp(hf_models, tmp_path, tp) -> None:
    """1 KV group, fewer than TP: each rank holds an even 1/TP slice of the group's fused rows (4 query
    heads, then the key head, then the value head: 6 x 32 = 192 rows), in memory and streamed alike."""
    src = hf_models["qwen2_kv1"]
    config, state = AutoConfig.from_pretrained(src), load_hf_state(src)
    shards = [qwen2.hf_to_megatron_shard(state, config, tp_rank=r, tp_size=tp) for r in range(tp)]
    for layer in range(2):
        fused = torch.cat([state[f"model.layers.{layer}.self_attn.{p}_proj.weight"] for p in "qkv"])
        fused_bias = torch.cat([state[f"model.layers.{layer}.self_attn.{p}_proj.bias"] for p in "qkv"])
        assert fused.shape == (192, 128)
        rows = 192 // tp
        for r, shard in enumerate(shards):
            qkv = f"decoder.layers.{layer}.self_attention.linear_qkv"
            assert torch.equal(shard[f"{qkv}.weight"], fused[r * rows : (r + 1) * rows])
            assert torch.equal(shard[f"{qkv}.bias"], fused_bias[r * rows : (r + 1) * rows])
    assert_same_tensors(qwen2.megatron_shards_to_hf([shards], config), state)
    hf_to_megatron(src, tmp_path / "mcore", tp=tp)  # writes rank by rank; stored as one global tensor
    stored = CheckpointReader(tmp_path / "mcore").read("decoder.layers.self_attention.linear_qkv.weight")
    assert torch.equal(stored[1], fused)


def test_sharded_input_and_output_load_in_transformers(hf_models, tmp_path) -> None:
    src = hf_models["qwen2_untied"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="600KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    hf_to_megatron(sharded, tmp_path / "mcore", tp=2, pp=2)
    megatron_to_hf(tmp_path / "mcore", tmp_path / "hf", max_shard_bytes=500_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_hf_state(src).values())
    assert_same_tensors(hf_tensors(tmp_path / "hf"), load_hf_state(src))
    ids = torch.arange(20)[None] * 37 % VOCAB_SIZE
    with torch.no_grad():
        want = model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)


def test_dtypes_bf16_kept_and_fp32_cast(hf_models, tmp_path) -> None:
    src = hf_models["qwen2_tied"]
    hf_to_megatron(src, tmp_path / "cast", tp=2, dtype="bf16")
    reader = CheckpointReader(tmp_path / "cast")
    assert {reader.dtype(k) for k in reader.tensor_shapes()} == {torch.bfloat16}
    megatron_to_hf(tmp_path / "cast", tmp_path / "hf_bf16")
    want = {n: t.to(torch.bfloat16) for n, t in load_hf_state(src).items()}
    assert_same_tensors(hf_tensors(tmp_path / "hf_bf16"), want)
    # A bf16 input stays bf16 and round-trips exactly.
    hf_to_megatron(tmp_path / "hf_bf16", tmp_path / "bf16", tp=1, pp=2)
    megatron_to_hf(tmp_path / "bf16", tmp_path / "hf_bf16_again")
    assert_same_tensors(hf_tensors(tmp_path / "hf_bf16_again"), want)


def test_write_hf_checkpoint_streams_and_checks_names(hf_models, tmp_path) -> None:
    src = hf_models["qwen2_tied"]
    state = load_hf_state(src)
    write_hf_checkpoint(tmp_path / "out", iter(state.items()), src, max_shard_bytes=1_000_000)
    assert_same_tensors(hf_tensors(tmp_path / "out"), state)
    assert (tmp_path / "out" / "tokenizer.json").exists()
    partial = [(n, t) for n, t in state.items() if n != "model.norm.weight"]
    with pytest.raises(KeyError, match=r"model\.norm\.weight"):
        write_hf_checkpoint(tmp_path / "partial", iter(partial), src)
    with pytest.raises(KeyError, match=r"lm_head\.weight is not a tensor"):  # tied: a head would be lost
        write_hf_checkpoint(tmp_path / "head", [*state.items(), ("lm_head.weight", state["model.embed_tokens.weight"])],
                            src)
    bad = dict(state, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 128)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: shape \(3, 128\).*\(256, 128\)"):
        write_hf_checkpoint(tmp_path / "shape", bad.items(), src)
    assert not (tmp_path / "partial").exists() and not (tmp_path / "head").exists()
    assert not (tmp_path / "shape").exists() and leftovers(tmp_path) == []


def edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_corrupted_hf_inputs_fail_clearly_and_write_nothing(hf_models, tmp_path) -> None:
    src = hf_models["qwen2_untied"]
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    cases = [(truncated, ValueError, r"model\.safetensors is not a valid safetensors file")]

    sharded = tmp_path / "missing_shard"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="600KB")
    shard = next(sharded.glob("model-00002-of-*.safetensors"))
    shard.unlink()
    cases.append((sharded, FileNotFoundError, rf"{shard.name} is missing"))
    cases.append((edited_copy(src, tmp_path / "kv", num_key_value_heads=4), ValueError,
                  r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(64, 128\).*gives \(128, 128\).*kv_heads=4"
                  .replace("kv_heads", "num_key_value_heads")))
    cases.append((edited_copy(src, tmp_path / "vocab", vocab_size=1024), ValueError,
                  r"model\.embed_tokens\.weight: shape \(1030, 128\).*\(1024, 128\)"))
    cases.append((edited_copy(src, tmp_path / "tied", tie_word_embeddings=True), ValueError,
                  r"lm_head\.weight differs from model\.embed_tokens\.weight.*tie_word_embeddings=True"))
    cases.append((edited_copy(hf_models["qwen2_tied"], tmp_path / "untied", tie_word_embeddings=False), KeyError,
                  r"missing for the config: \['lm_head\.weight'\].*tie_word_embeddings=False"))
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    for i, (source, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            hf_to_megatron(source, out_parent / f"out{i}", tp=2)
    assert list(out_parent.iterdir()) == []
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp_size=8"):
        hf_to_megatron(src, out_parent / "tp8", tp=8)  # 2 KV groups divide 8, but 4 heads do not
    with pytest.raises(ValueError, match="num_layers=2 is not divisible by pp_size=3"):
        hf_to_megatron(src, out_parent / "pp3", pp=3)
    hf_to_megatron(src, out_parent / "done")
    with pytest.raises(FileExistsError, match="already exists"):
        hf_to_megatron(src, out_parent / "done")


def test_kv_groups_and_tp_must_divide_one_another(hf_models) -> None:
    """Megatron splits whole KV groups over TP, or one group over TP / groups ranks; nothing in between."""
    shape = GPTShape.from_hf(AutoConfig.from_pretrained(hf_models["qwen2_gqa8"]))  # 8 heads, 4 groups, dim 32
    assert qwen2.qkv_shard_rows(shape, 1, 2) == slice(256, 512)  # 2 whole groups of (2 + 2) x 32 rows
    assert qwen2.qkv_shard_rows(shape, 5, 8) == slice(320, 384)  # half of group 2
    six = dataclasses.replace(shape, num_attention_heads=6, num_query_groups=3)
    with pytest.raises(ValueError, match="num_query_groups=3 and tp_size=2: one must divide the other"):
        qwen2.qkv_shard_rows(six, 0, 2)
    with pytest.raises(ValueError, match="tp_rank=4 is outside"):
        qwen2.qkv_shard_rows(shape, 4, 4)


def test_megatron_to_hf_rejects_a_config_the_checkpoint_contradicts(hf_models, tmp_path) -> None:
    src = hf_models["qwen2_untied"]
    ckpt = tmp_path / "mcore"
    hf_to_megatron(src, ckpt, tp=2)
    out = tmp_path / "outputs"
    out.mkdir()
    cases = [
        (edited_copy(src, tmp_path / "kv", num_key_value_heads=4), ValueError,
         r"decoder\.layers\.self_attention\.linear_qkv\.weight: shape \(2, 256, 128\).*gives \(2, 384, 128\)"),
        (edited_copy(src, tmp_path / "tied", tie_word_embeddings=True), KeyError,
         r"does not have: \['output_layer\.weight'\].*tie_word_embeddings=True"),
        (edited_copy(src, tmp_path / "vocab", vocab_size=1000), ValueError,
         r"row 1000 beyond config\.json's vocab_size=1000 is not zero"),
        (edited_copy(src, tmp_path / "big_vocab", vocab_size=1300), ValueError,
         r"1280 rows in the checkpoint, fewer than config\.json's vocab_size=1300"),
    ]
    for i, (config_dir, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            megatron_to_hf(ckpt, out / f"out{i}", hf_config_from=config_dir)
    (ckpt / ".metadata").unlink()
    with pytest.raises(FileNotFoundError, match="not a Megatron distributed checkpoint"):
        megatron_to_hf(ckpt, out / "broken")
    assert list(out.iterdir()) == []


def test_cli_converts_both_ways_with_verify(hf_models, tmp_path, capsys) -> None:
    from megatron_rl.cli import main

    src = hf_models["qwen2_tied"]
    assert main(["convert", "hf-to-megatron", str(src), str(tmp_path / "mcore"), "--tp", "2", "--pp", "2",
                 "--verify"]) == 0
    assert main(["convert", "megatron-to-hf", str(tmp_path / "mcore"), str(tmp_path / "hf"), "--verify"]) == 0
    printed = capsys.readouterr().out
    diffs = [float(line.rsplit("=", 1)[1]) for line in printed.splitlines() if line.startswith("verify:")]
    assert len(diffs) == 2 and all(d < 1e-4 for d in diffs), printed
    assert_same_tensors(hf_tensors(tmp_path / "hf"), load_hf_state(src))
    assert main(["convert", "megatron-to-hf", str(tmp_path / "mcore"), str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_verify_fails_on_wrong_weights(hf_models, tmp_path) -> None:
    """compare_logits sees a Megatron checkpoint whose weights differ from the HF model's."""
    hf_to_megatron(hf_models["qwen2_untied"], tmp_path / "mcore")
    wrong = tmp_path / "wrong"
    shutil.copytree(hf_models["qwen2_untied"], wrong)
    state = load_hf_state(wrong)
    state["model.layers.1.self_attn.k_proj.bias"] += 0.5
    from safetensors.torch import save_file

    save_file(state, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    assert convert.compare_logits(hf_models["qwen2_untied"], tmp_path / "mcore") < 1e-4
    with pytest.raises(ValueError, match="verify failed: max |logit diff|"):
        convert.compare_logits(wrong, tmp_path / "mcore")


def draws() -> tuple:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), tracked.tolist()


def test_rng_state_round_trip_with_model_only_checkpoint(hf_models, tmp_path) -> None:
    from megatron_rl.checkpoint.distributed import load_checkpoint, save_checkpoint
    from megatron_rl.megatron.model import build_gpt_model

    config = AutoConfig.from_pretrained(hf_models["qwen2_tied"])
    with convert.one_process_world():
        model = build_gpt_model(config)
        hf_to_megatron(hf_models["qwen2_tied"], tmp_path / "mcore", tp=2, pp=2)
        assert load_checkpoint(tmp_path / "mcore", model) == 0  # model-only, no RNG state: nothing restored
        want = qwen2.hf_to_megatron_shard(load_hf_state(hf_models["qwen2_tied"]), config)
        params = dict(model.named_parameters())
        assert sorted(params) == sorted(want) and all(torch.equal(params[n], want[n]) for n in want)
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        save_checkpoint(tmp_path / "saved", model, None, iteration=7)
        expected = draws()
        assert draws() != expected  # the streams moved on
        with pytest.raises(ValueError, match="holds no optimizer state"):
            load_checkpoint(tmp_path / "saved", model, object())
        assert load_checkpoint(tmp_path / "saved", model) == 7
        assert draws() == expected
