"""The converter against Megatron itself, over 4 gloo processes: the layout Megatron saves, logits of
converted checkpoints at TP=2, and a checkpoint saved by training at TP=2 x PP=2 exported to HF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import fixed_batch, launch_ranks, load_hf_state
from test_convert import assert_same_tensors, hf_tensors
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_rl.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_rl.checkpoint.hf_io import write_model_metadata
from megatron_rl.checkpoint.megatron_io import CheckpointReader
from megatron_rl.checkpoint.qwen2 import megatron_shards_to_hf

WORKER = Path(__file__).with_name("_convert_worker.py")


@pytest.fixture(scope="module")
def run_dir(hf_models, tmp_path_factory) -> Path:
    """Converted inputs, then one launch of the 4-rank worker (about 40 s on 2 idle cores; the timeout
    allows for a machine shared with other jobs)."""
    out = tmp_path_factory.mktemp("convert_ranks")
    hf_to_megatron(hf_models["qwen2_tied"], out / "conv_tied_1x1", tp=1, pp=1)
    hf_to_megatron(hf_models["qwen2_untied"], out / "conv_untied_2x1", tp=2, pp=1)
    hf_to_megatron(hf_models["qwen2_kv1"], out / "conv_kv1_2x1", tp=2, pp=1)
    models = [str(hf_models[m]) for m in ("qwen2_tied", "qwen2_untied", "qwen2_kv1")]
    launch_ranks(WORKER, models, out, world_size=4, timeout_s=420)
    return out


def rank_results(run_dir: Path) -> list[dict]:
    return [torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in range(4)]


def test_converter_writes_what_megatron_saves(hf_models, run_dir, tmp_path) -> None:
    """Same keys, global shapes, chunks, dtypes and values as Megatron's own model-only save at TP=2 x PP=2."""
    hf_to_megatron(hf_models["qwen2_untied"], tmp_path / "conv", tp=2, pp=2)
    ours = FileSystemReader(str(tmp_path / "conv")).read_metadata().state_dict_metadata
    theirs = FileSystemReader(str(run_dir / "mcore_untied_2x2")).read_metadata().state_dict_metadata
    theirs = {k: md for k, md in theirs.items() if not k.startswith("rng_state/")}  # save_checkpoint adds it
    assert sorted(ours) == sorted(theirs)
    for key, md in theirs.items():
        if hasattr(md, "chunks"):
            assert ours[key].size == md.size and ours[key].properties.dtype == md.properties.dtype, key
            assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in ours[key].chunks) == sorted(
                (tuple(c.offsets), tuple(c.sizes)) for c in md.chunks), key
    a, b = CheckpointReader(tmp_path / "conv"), CheckpointReader(run_dir / "mcore_untied_2x2")
    for key in a.tensor_shapes():
        assert torch.equal(a.read(key), b.read(key)), key


@pytest.mark.parametrize("model", ["qwen2_tied", "qwen2_untied", "qwen2_kv1"])
def test_converted_checkpoint_gives_hf_logits_at_tp2(hf_models, run_dir, model) -> None:
    config = AutoConfig.from_pretrained(hf_models[model])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf_models[model], dtype=torch.float32)(
            fixed_batch(config.vocab_size)).logits
    for result in rank_results(run_dir):
        got = result[f"logits_{model.split('_')[1]}"]
        assert got.shape == want.shape
        # fp32, TP=2 sums in another order than transformers: logits of a few nats differ by ~20 ulps at most
        # (measured max 1.05e-5 absolute, 4e-6 relative); a layout error would be off by O(1).
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_checkpoint_at_tp2_pp2_exports_to_hf(hf_models, run_dir, tmp_path) -> None:
    src = hf_models["qwen2_tied"]
    ckpt = run_dir / "train_tied_2x2"
    stored = CheckpointReader(ckpt)
    assert any(k.startswith("optimizer.") for k in stored.tensor_shapes())
    assert sorted(k for k in stored.object_keys() if k.startswith("rng_state/")) == [
        f"rng_state/shard_{p}.{t}_2.2" for p in range(2) for t in range(2)]
    write_model_metadata(ckpt, src)  # what the trainer adds next to its checkpoints
    megatron_to_hf(ckpt, tmp_path / "hf")
    config = AutoConfig.from_pretrained(src)
    results = rank_results(run_dir)
    shards = [[None, None], [None, None]]
    for result in results:
        shards[result["info"].pp_rank][result["info"].tp_rank] = result["params"]
    trained = megatron_shards_to_hf(shards, config)
    exported = hf_tensors(tmp_path / "hf")
    assert_same_tensors(exported, trained)
    original = load_hf_state(src)
    assert any(not torch.equal(trained[n], original[n]) for n in original)  # one Adam step changed the weights
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, trained["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, trained["model.embed_tokens.weight"])  # tied
