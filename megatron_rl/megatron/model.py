"""Megatron-Core ``GPTModel`` from a Hugging Face config (Qwen2 / Qwen2.5 and Llama)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LAYER_SPECS",
    "SUPPORTED_MODEL_TYPES",
    "GPTShape",
    "build_gpt_model",
    "padded_vocab_size",
    "resolve_layer_spec",
    "transformer_config_from_hf",
    "transformer_engine_usable",
]

# model_type -> whether the q/k/v projections carry a bias.
SUPPORTED_MODEL_TYPES: dict[str, bool] = {"qwen2": True, "llama": False}

LAYER_SPECS = ("auto", "local", "te")
"""``layer_spec`` values of :func:`build_gpt_model`: "local" (Megatron's torch layers, the CPU path),
"te" (Transformer Engine layers, CUDA only), "auto" ("te" when usable, else "local")."""


@dataclasses.dataclass(frozen=True)
class GPTShape:
    """The plain numbers of a dense decoder, read from an HF config (what the converters need)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # the HF vocabulary (rows of embed_tokens); Megatron pads beyond it
    tied_embeddings: bool
    qkv_bias: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, hf_config: Any) -> GPTShape:
        """Read the shape; raise ValueError for an unsupported model_type or option."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; known: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        if head_dim * heads != hf_config.hidden_size:
            raise ValueError(f"head_dim={head_dim} x heads={heads} != hidden_size={hf_config.hidden_size}")
        qkv_bias = SUPPORTED_MODEL_TYPES[model_type]
        llama_biases = getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)
        if model_type == "llama" and llama_biases:
            raise ValueError("llama with attention_bias/mlp_bias is not supported")
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported; only 'silu'")
        # transformers 5 keeps RoPE in rope_parameters (rope_scaling is an alias of it); 4.x in rope_scaling.
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type={rope_type!r} is not supported; only default RoPE")
        rope_theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
        if rope_theta is None:
            raise ValueError("the HF config has no rope_theta")
        return cls(
            model_type=model_type,
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            ffn_hidden_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope_theta),
            max_position_embeddings=hf_config.max_position_embeddings,
        )


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp_size: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by * tp_size``.

    Example: 1000 tokens, divisor 128, TP=2 -> multiple of 256 -> 1024.
    """
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def transformer_config_from_hf(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    tp_size: int = 1,
    pp_size: int = 1,
    **overrides: Any,
):
    """A Megatron ``TransformerConfig`` equivalent to ``hf_config`` (dropout off, CPU-safe fusions off).

    ``overrides`` are any further TransformerConfig fields (e.g. ``recompute_granularity``). Sequence
    parallelism is off: on CPU it needs a further shim (DESIGN.md item 11) that is not written yet.
    """
    from megatron.core.transformer import TransformerConfig

    shape = GPTShape.from_hf(hf_config)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_query_groups": shape.num_query_groups,
        "kv_channels": shape.head_dim,
        "ffn_hidden_size": shape.ffn_hidden_size,
        "normalization": "RMSNorm",
        "layernorm_epsilon": shape.rms_norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": shape.qkv_bias,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "params_dtype": params_dtype,
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        "tensor_model_parallel_size": tp_size,
        "pipeline_model_parallel_size": pp_size,
        "pipeline_dtype": params_dtype,
        "use_cpu_initialization": not cuda,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
    }
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def transformer_engine_usable() -> tuple[bool, str]:
    """Whether the Transformer Engine layer spec can run here: CUDA present and ``transformer_engine``
    importable. Returns ``(usable, reason)``; ``reason`` says what is missing (empty when usable)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA is not available")
    if importlib.util.find_spec("transformer_engine") is None:
        missing.append("transformer_engine is not installed")
    return not missing, "; ".join(missing)


def resolve_layer_spec(layer_spec: str) -> str:
    """The concrete layer spec ("local" or "te") for a requested ``layer_spec`` (one of :data:`LAYER_SPECS`).

    "auto" picks "te" when :func:`transformer_engine_usable`, else "local".

    Raises:
        ValueError: ``layer_spec`` is not one of :data:`LAYER_SPECS`, or is "te" where TE is not usable
            (the message says what is missing).
    """
    if layer_spec not in LAYER_SPECS:
        raise ValueError(f"layer_spec={layer_spec!r}; allowed: {', '.join(LAYER_SPECS)}")
    usable, reason = transformer_engine_usable()
    if layer_spec == "auto":
        return "te" if usable else "local"
    if layer_spec == "te" and not usable:
        raise ValueError(f"layer_spec='te' needs Transformer Engine on a CUDA device: {reason} "
                         "(use layer_spec='local' or 'auto')")
    return layer_spec


def _layer_spec(resolved: str):
    """Megatron's ModuleSpec of one decoder layer for a resolved layer spec ("local" or "te")."""
    from megatron.core.models.gpt import gpt_layer_specs

    if resolved == "te":
        # TE fuses each pre-norm into the following linear: the norm weights are
        # self_attention.linear_qkv.layer_norm_weight and mlp.linear_fc1.layer_norm_weight.
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    tp_size: int = 1,
    pp_size: int = 1,
    pre_process: bool = True,
    post_process: bool = True,
    make_vocab_size_divisible_by: int = 128,
    layer_spec: str = "local",
    **config_overrides: Any,
):
    """A Megatron ``GPTModel`` (RoPE, RMSNorm, SwiGLU) for this rank's TP/PP slice.

    The embedding is padded to :func:`padded_vocab_size` rows; ``model.hf_vocab_size`` keeps the HF
    vocabulary size (to cut padded logits and rows later). The logits are vocab-parallel (each TP rank
    holds ``padded_vocab / tp`` columns); see :mod:`megatron_rl.megatron.logprobs`.

    ``layer_spec`` (see :data:`LAYER_SPECS`, :func:`resolve_layer_spec`) picks the decoder layers;
    ``model.layer_spec`` records the one used. The Transformer Engine layers name the RMSNorm weights
    differently from the local ones (``linear_qkv.layer_norm_weight`` instead of
    ``input_layernorm.weight``, ``linear_fc1.layer_norm_weight`` instead of ``pre_mlp_layernorm.weight``)
    and carry ``_extra_state`` entries; :mod:`megatron_rl.checkpoint.qwen2` (and so the converters and
    the weight sync) maps the local names only, which is why "local" is the default: "te" and "auto"
    build a model that the training path cannot load HF weights into yet.

    Raises:
        ValueError: unsupported HF config, unknown ``layer_spec``, or "te" without TE/CUDA.
    """
    from megatron.core.models.gpt import GPTModel

    resolved = resolve_layer_spec(layer_spec)
    shape = GPTShape.from_hf(hf_config)
    config = transformer_config_from_hf(
        hf_config, params_dtype=params_dtype, tp_size=tp_size, pp_size=pp_size, **config_overrides
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(resolved),
        vocab_size=padded_vocab_size(shape.vocab_size, make_vocab_size_divisible_by, tp_size),
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=shape.rope_theta,
    )
    model.hf_vocab_size = shape.vocab_size
    model.layer_spec = resolved
    return model
