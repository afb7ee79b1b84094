"""Megatron-Core ``GPTModel`` from a Hugging Face config (Qwen2 / Qwen2.5 and Llama)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LAYER_SPECS",
    "RECOMPUTE_GRANULARITIES",
    "SUPPORTED_MODEL_TYPES",
    "GPTShape",
    "build_gpt_model",
    "compare_layer_specs",
    "padded_vocab_size",
    "place_model",
    "recompute_overrides",
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


RECOMPUTE_GRANULARITIES = (None, "selective", "full")
"""``recompute_granularity`` values of :func:`build_gpt_model` (Megatron's; None: no recompute)."""


def recompute_overrides(
    recompute_granularity: str | None,
    recompute_method: str | None = "uniform",
    recompute_num_layers: int | None = 1,
    *,
    num_layers_per_stage: int | None = None,
) -> dict[str, Any]:
    """The three recompute fields of Megatron's ``TransformerConfig`` for a requested recompute.

    ``recompute_granularity`` None or "none": no recompute (method and layers dropped); "selective":
    Megatron recomputes each layer's core attention (its default ``recompute_modules``), method and
    layers must be None there, so they are dropped; "full": the decoder layers run in checkpointed
    units (``recompute_method`` "uniform" or "block", ``recompute_num_layers`` >= 1). Megatron applies
    full recompute only in training mode (the update's forward), never to no-grad logprob forwards.

    Raises:
        ValueError: unknown granularity or method, ``recompute_num_layers`` < 1, or (uniform) a unit
            size that does not divide ``num_layers_per_stage`` (Megatron would index past the last layer).
    """
    if recompute_granularity in (None, "none"):
        return {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
    if recompute_granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_method": None, "recompute_num_layers": None}
    if recompute_granularity != "full":
        raise ValueError(f"recompute_granularity={recompute_granularity!r}; allowed: none, selective, full")
    if recompute_method not in ("uniform", "block"):
        raise ValueError(f"recompute_method={recompute_method!r}; allowed with full recompute: uniform, block")
    if isinstance(recompute_num_layers, bool) or not isinstance(recompute_num_layers, int) or recompute_num_layers < 1:
        raise ValueError(f"recompute_num_layers={recompute_num_layers!r} must be an integer >= 1")
    per_stage = num_layers_per_stage
    if recompute_method == "uniform" and per_stage is not None and per_stage % recompute_num_layers:
        raise ValueError(f"recompute_num_layers={recompute_num_layers} must divide the {num_layers_per_stage} "
                         "layers of a pipeline stage with recompute_method='uniform'")
    return {"recompute_granularity": "full", "recompute_method": recompute_method,
            "recompute_num_layers": recompute_num_layers}


def transformer_config_from_hf(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    tp_size: int = 1,
    pp_size: int = 1,
    recompute_granularity: str | None = None,
    recompute_method: str | None = "uniform",
    recompute_num_layers: int | None = 1,
    **overrides: Any,
):
    """A Megatron ``TransformerConfig`` equivalent to ``hf_config`` (dropout off, CPU-safe fusions off).

    ``recompute_*`` pick activation recompute (see :func:`recompute_overrides`; default none).
    ``overrides`` are any further TransformerConfig fields. Sequence
    parallelism is off: on CPU it needs a further shim (DESIGN.md item 11) that is not written yet.
    """
    from megatron.core.transformer import TransformerConfig

    shape = GPTShape.from_hf(hf_config)
    recompute = recompute_overrides(recompute_granularity, recompute_method, recompute_num_layers,
                                    num_layers_per_stage=shape.num_layers // pp_size)
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
        **recompute,
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
        # self_attention.linear_qkv.layer_norm_weight and mlp.linear_fc1.layer_norm_weight
        # (megatron_rl.checkpoint.qwen2.te_layer_name maps them).
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
    recompute_granularity: str | None = None,
    recompute_method: str | None = "uniform",
    recompute_num_layers: int | None = 1,
    tie_embeddings: bool | None = None,
    **config_overrides: Any,
):
    """A Megatron ``GPTModel`` (RoPE, RMSNorm, SwiGLU) for this rank's TP/PP slice.

    The embedding is padded to :func:`padded_vocab_size` rows; ``model.hf_vocab_size`` keeps the HF
    vocabulary size (to cut padded logits and rows later). The logits are vocab-parallel (each TP rank
    holds ``padded_vocab / tp`` columns); see :mod:`megatron_rl.megatron.logprobs`.

    ``recompute_granularity`` (None/"none", "selective", "full"), ``recompute_method`` and
    ``recompute_num_layers`` set activation recompute (:func:`recompute_overrides`).

    ``tie_embeddings`` None: the output layer shares the word embedding when the HF config ties them;
    False: an output layer of its own whatever the HF config says (the critic replaces it with its
    value head, :mod:`megatron_rl.megatron.critic`).

    ``layer_spec`` (see :data:`LAYER_SPECS`, :func:`resolve_layer_spec`) picks the decoder layers;
    ``model.layer_spec`` records the one used. The Transformer Engine layers name the RMSNorm weights
    differently from the local ones (``linear_qkv.layer_norm_weight`` instead of
    ``input_layernorm.weight``, ``linear_fc1.layer_norm_weight`` instead of ``pre_mlp_layernorm.weight``)
    and carry ``_extra_state`` entries; :mod:`megatron_rl.checkpoint.qwen2` maps both namings (its TE
    names come from Megatron-Core's own local-to-TE key map), so loading HF weights, the converters and
    the weight sync work with either spec. :func:`compare_layer_specs` checks the two against each other
    on a GPU.

    Raises:
        ValueError: unsupported HF config, unknown ``layer_spec``, or "te" without TE/CUDA.
    """
    from megatron.core.models.gpt import GPTModel

    resolved = resolve_layer_spec(layer_spec)
    shape = GPTShape.from_hf(hf_config)
    config = transformer_config_from_hf(
        hf_config, params_dtype=params_dtype, tp_size=tp_size, pp_size=pp_size,
        recompute_granularity=recompute_granularity, recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers, **config_overrides
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(resolved),
        vocab_size=padded_vocab_size(shape.vocab_size, make_vocab_size_divisible_by, tp_size),
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tied_embeddings if tie_embeddings is None else tie_embeddings,
        position_embedding_type="rope",
        rotary_base=shape.rope_theta,
    )
    if torch.cuda.is_available():
        place_model(model, params_dtype, torch.device("cuda", torch.cuda.current_device()))
    model.hf_vocab_size = shape.vocab_size
    model.layer_spec = resolved
    return model


def place_model(model: torch.nn.Module, params_dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Every parameter and buffer of ``model`` on ``device`` and every floating-point one in
    ``params_dtype``, as Megatron's own ``get_model`` does (``module.cuda()``, then ``Float16Module``
    casts the whole module to bf16/fp16).

    ``build_gpt_model`` calls it on CUDA: the local spec's norms are torch modules that Megatron builds
    on the CPU in fp32 whatever ``params_dtype`` says (seen on an H100: the bf16 optimizer then refused
    their fp32 CPU weights). Returns ``model``."""
    model.to(device)
    if params_dtype != torch.float32:
        model.to(params_dtype)
    return model


def compare_layer_specs(hf_dir: Any, *, params_dtype: torch.dtype = torch.float32, batch: int = 2, seq: int = 64,
                        seed: int = 0) -> float:
    """Max |logit difference| between a Transformer Engine model and a local-spec model holding the same
    HF weights (the GPU check of the TE layer spec).

    Both are built by :func:`build_gpt_model` (TP=1, PP=1, this process, ``params_dtype``) and filled by
    :func:`megatron_rl.checkpoint.qwen2.load_hf_into_model` from ``hf_dir``'s safetensors, the TE model
    through its TE parameter names; both run one fixed batch of ``batch`` x ``seq`` random token ids
    (``seed``) in eval mode, and the logits are compared over the HF vocabulary. The difference is TE's
    kernels only (fused attention, TF32 or bf16 GEMMs): fp32 weights give about 1e-3 on the tiny model.
    Starts a one-process world when torch.distributed is not initialised (and tears it down after).

    Raises:
        ValueError: Transformer Engine is not usable here (the message says what is missing), or an
            unsupported HF config.
        KeyError: the TE model's parameter names are not the map's (named in the message).
    """
    from megatron_rl.checkpoint.convert import one_process_world
    from megatron_rl.checkpoint.hf_io import SafetensorsSource, load_hf_config
    from megatron_rl.checkpoint.qwen2 import load_hf_into_model

    resolve_layer_spec("te")  # refuse early, saying what is missing
    config = load_hf_config(hf_dir)
    source = SafetensorsSource(hf_dir)
    state = {name: source.read(name) for name in source.names()}
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    logits = {}
    with one_process_world():
        for spec in ("local", "te"):
            model = build_gpt_model(config, params_dtype=params_dtype, layer_spec=spec)
            load_hf_into_model(model, state, config, tp_rank=0, tp_size=1)
            device = next(model.parameters()).device
            model.eval()
            with torch.no_grad():
                tokens = ids.to(device)
                positions = torch.arange(seq, device=device).expand_as(tokens)
                logits[spec] = model(tokens, positions, None)[..., : config.vocab_size].float().cpu()
            del model
    return (logits["te"] - logits["local"]).abs().max().item()
