"""Tests for megatron_rl.testing.tiny_model: the offline tiny Qwen2 checkpoint."""

from __future__ import annotations

import json
import pathlib
import unicodedata

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from megatron_rl.testing import SUPPORTED_HEAD_DIMS, TOKENIZER_VOCAB_SIZE, tiny_model

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

ROUND_TRIP_TEXTS = [
    "<think>\nThe pain radiates to the left arm.\n</think>\n<answer>A</answer>",
    "Question: Which drug?\nA: Aspirin\nB: Heparin\n\n\n<answer>B</answer>",
    "  leading and trailing spaces  \n\ttab\r\nCRLF ",
    "Temp 38,5 °C, fièvre; Größe 1.80 m; 你好; 🙂 dosis ≤ 5 mg; naïve café",
    "Dates 2024-01-12 and 05/09/2022, numbers 123456789 and 0.0007",
    "</think></answer><think><answer>",
    "Spaces before punctuation : yes , it 's fine . Really ? no !",
    "unseen words: zygomaticomaxillary xylophone QWERTY",
    "",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forbid hub access: the env var, plus the constant huggingface_hub read at import time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    hub_globals = huggingface_hub.is_offline_mode.__globals__
    if "HF_HUB_OFFLINE" in hub_globals:
        monkeypatch.setitem(hub_globals, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: pathlib.Path):
    return AutoTokenizer.from_pretrained(model_dir)


def _tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_returns_path_with_checkpoint_files(tmp_path: pathlib.Path) -> None:
    out = tiny_model(str(tmp_path / "a" / "b"))
    assert out == tmp_path / "a" / "b"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name


def test_config_is_tiny_qwen2_with_gqa_and_tied_embeddings(model_dir: pathlib.Path, tokenizer) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "qwen2"
    assert config.architectures == ["Qwen2ForCausalLM"]
    head_dim = config.hidden_size // config.num_attention_heads
    assert config.hidden_size % config.num_attention_heads == 0
    assert head_dim >= 32 and head_dim in SUPPORTED_HEAD_DIMS
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (128, 4, 2)
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert (config.num_hidden_layers, config.intermediate_size) == (2, 256)
    assert config.max_position_embeddings == 4096
    assert config.rms_norm_eps == pytest.approx(1e-6)
    assert config.rope_parameters["rope_theta"] == pytest.approx(1e6)
    assert config.hidden_act == "silu"
    assert config.tie_word_embeddings is True
    assert config.vocab_size == len(tokenizer) == TOKENIZER_VOCAB_SIZE
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>") == tokenizer.pad_token_id
    assert config.bos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_config_json_also_has_legacy_keys_for_transformers_4(model_dir: pathlib.Path) -> None:
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["rope_theta"] == pytest.approx(1e6)
    assert raw["torch_dtype"] == "float32"


def test_safetensors_are_fp32_tied_with_qkv_bias(model_dir: pathlib.Path) -> None:
    tensors = _tensors(model_dir)
    assert "lm_head.weight" not in tensors  # tied: only the embedding is stored
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (TOKENIZER_VOCAB_SIZE, 128)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 128)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 128)
    assert tensors["model.layers.0.self_attn.k_proj.bias"].shape == (2 * 32,)
    assert "model.layers.0.self_attn.o_proj.bias" not in tensors
    assert tensors["model.layers.1.mlp.gate_proj.weight"].shape == (256, 128)
    assert "model.layers.2.mlp.gate_proj.weight" not in tensors


def test_forward_pass_gives_finite_logits(model_dir: pathlib.Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What causes scurvy?"}], add_generation_prompt=True, tokenize=False
    )
    input_ids = torch.tensor([tokenizer.encode(ids, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], TOKENIZER_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_encode_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < TOKENIZER_VOCAB_SIZE for i in ids)


def test_decomposed_unicode_is_nfc_normalised_like_qwen(tokenizer) -> None:
    text = "cafe\u0301 e\u0301"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == unicodedata.normalize("NFC", text)


def test_tokenizer_json_agrees_with_autotokenizer(model_dir: pathlib.Path, tokenizer) -> None:
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS + ["<|im_start|>user\nhi<|im_end|>\n", "cafe\u0301"]:
        assert raw.encode(text, add_special_tokens=False).ids == tokenizer.encode(text, add_special_tokens=False)


def test_tokenizer_learned_the_corpus(tokenizer) -> None:
    # Trained BPE merges frequent words into single tokens; a broken/empty training would not.
    for word in ("Question", " the", "think", "answer"):
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024", add_special_tokens=False)] == list("2024")


def test_chat_template_default_system_and_generation_prompt(tokenizer) -> None:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_explicit_system_and_multi_turn(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>x</think><answer>A</answer>"},
        {"role": "user", "content": "Q2"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\n<think>x</think><answer>A</answer><|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
    )


def test_special_tokens_are_single_ids_at_end_of_vocab(tokenizer) -> None:
    ids = {}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        encoded = tokenizer.encode(token, add_special_tokens=False)
        assert len(encoded) == 1, token
        ids[token] = encoded[0]
    assert sorted(ids.values()) == list(range(TOKENIZER_VOCAB_SIZE - 3, TOKENIZER_VOCAB_SIZE))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    encoded = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert encoded[0] == ids["<|im_start|>"] and encoded[-1] == ids["<|im_end|>"]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "user\nhi"


def test_generation_config_stops_on_im_end_and_endoftext(model_dir: pathlib.Path, tokenizer) -> None:
    generation = GenerationConfig.from_pretrained(model_dir)
    assert generation.eos_token_id == [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    assert generation.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_config_is_portable(model_dir: pathlib.Path) -> None:
    raw = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert raw["tokenizer_class"] == "Qwen2Tokenizer"
    assert raw["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert not isinstance(raw.get("extra_special_tokens"), list)  # transformers 4.x needs a dict there
    assert "<|im_start|>assistant" in raw["chat_template"]
    assert raw["clean_up_tokenization_spaces"] is False


def test_same_seed_identical_files_different_seed_differs(tmp_path: pathlib.Path) -> None:
    a = tiny_model(tmp_path / "a", seed=1)
    b = tiny_model(tmp_path / "b", seed=1)
    c = tiny_model(tmp_path / "c", seed=2)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_global_rng_is_left_alone(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_untied_override_stores_lm_head(tmp_path: pathlib.Path) -> None:
    path = tiny_model(tmp_path / "untied", tie_word_embeddings=False)
    tensors = _tensors(path)
    assert "lm_head.weight" in tensors
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert AutoConfig.from_pretrained(path).tie_word_embeddings is False


def test_layer_and_width_overrides(tmp_path: pathlib.Path) -> None:
    path = tiny_model(tmp_path / "m", num_hidden_layers=3, hidden_size=256, intermediate_size=512)
    config = AutoConfig.from_pretrained(path)
    assert (config.num_hidden_layers, config.hidden_size) == (3, 256)
    tensors = _tensors(path)
    assert "model.layers.2.mlp.up_proj.weight" in tensors
    assert "model.layers.3.mlp.up_proj.weight" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (256, 256)  # 4 heads of 64


def test_larger_vocab_pads_the_embedding(tmp_path: pathlib.Path) -> None:
    path = tiny_model(tmp_path / "m", vocab_size=1088)
    assert _tensors(path)["model.embed_tokens.weight"].shape == (1088, 128)
    assert len(AutoTokenizer.from_pretrained(path)) == TOKENIZER_VOCAB_SIZE


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"not_a_field": 1}, ["not_a_field"]),
        ({"num_layers": 3}, ["num_layers"]),
        ({"num_attention_heads": 8}, ["head_dim=16", "num_attention_heads=8"]),
        ({"hidden_size": 64, "num_attention_heads": 4}, ["head_dim=16", "hidden_size=64"]),
        ({"hidden_size": 130}, ["hidden_size=130", "num_attention_heads=4"]),
        ({"num_key_value_heads": 3}, ["num_key_value_heads=3"]),
        ({"vocab_size": 1000}, ["vocab_size=1000"]),
        ({"num_hidden_layers": 0}, ["num_hidden_layers=0"]),
    ],
)
def test_bad_overrides_raise_value_error_naming_the_field(
    tmp_path: pathlib.Path, overrides: dict, fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as excinfo:
        tiny_model(tmp_path / "bad", **overrides)
    for fragment in fragments:
        assert fragment in str(excinfo.value)
    assert not (tmp_path / "bad").exists()  # validation happens before anything is written
