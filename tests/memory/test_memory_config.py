"""The memory section, the recompute fields and how they reach Megatron's TransformerConfig."""

from __future__ import annotations

import pytest


def test_memory_section_defaults_and_validation() -> None:
    from megatron_rl.config import Config, load_config
    from megatron_rl.memory import MemoryConfig

    cfg = load_config(None, [])
    assert isinstance(cfg.memory, MemoryConfig) and cfg.memory == Config().memory
    assert (cfg.memory.check, cfg.memory.device_memory_gib, cfg.memory.offload_reference,
            cfg.memory.offload_optimizer) == (True, 0.0, "auto", "auto")
    cfg = load_config(None, ["memory.offload_reference=on", "memory.device_memory_gib=40", "memory.check=false"])
    assert (cfg.memory.offload_reference, cfg.memory.device_memory_gib, cfg.memory.check) == ("on", 40.0, False)
    assert load_config(None, ["memory.offload_optimizer=off"]).memory.offload_optimizer == "off"  # YAML: false
    with pytest.raises(ValueError, match="memory.offload_optimizer='sometimes'"):
        load_config(None, ["memory.offload_optimizer=sometimes"])
    with pytest.raises(ValueError, match=r"memory.device_memory_gib=-1.0 must be >= 0"):
        MemoryConfig(device_memory_gib=-1.0)
    with pytest.raises(ValueError, match="memory.check=1 must be true or false"):
        MemoryConfig(check=1)


def test_recompute_fields_are_validated() -> None:
    from megatron_rl.config import load_config

    cfg = load_config(None, ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"])
    assert (cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers) == ("full", "block", 2)
    with pytest.raises(ValueError, match="model.recompute='all'"):
        load_config(None, ["model.recompute=all"])
    with pytest.raises(ValueError, match="model.recompute_method='even'"):
        load_config(None, ["model.recompute_method=even"])
    with pytest.raises(ValueError, match="model.recompute_num_layers=0 must be >= 1"):
        load_config(None, ["model.recompute_num_layers=0"])


def test_recompute_overrides_follow_megatron_rules() -> None:
    """Megatron 0.16.1 (TransformerConfig.__post_init__): 'full' needs a method and a layer count; 'selective'
    needs both None; no recompute sets none of them."""
    from megatron_rl.megatron.model import recompute_overrides

    assert recompute_overrides("none") == recompute_overrides(None) == {
        "recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
    assert recompute_overrides("selective", "block", 3) == {
        "recompute_granularity": "selective", "recompute_method": None, "recompute_num_layers": None}
    assert recompute_overrides("full", "uniform", 2, num_layers_per_stage=4) == {
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2}
    with pytest.raises(ValueError, match="recompute_num_layers=3 must divide the 4 layers"):
        recompute_overrides("full", "uniform", 3, num_layers_per_stage=4)
    assert recompute_overrides("full", "block", 3, num_layers_per_stage=4)["recompute_num_layers"] == 3
    with pytest.raises(ValueError, match="recompute_granularity='most'"):
        recompute_overrides("most")


def test_recompute_reaches_the_transformer_config(model_dirs) -> None:
    from transformers import AutoConfig

    from megatron_rl.megatron.model import transformer_config_from_hf

    hf_config = AutoConfig.from_pretrained(model_dirs["tiny"])
    config = transformer_config_from_hf(hf_config, recompute_granularity="full", recompute_method="block",
                                        recompute_num_layers=1)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 1)
    config = transformer_config_from_hf(hf_config, recompute_granularity="selective")
    assert (config.recompute_granularity, config.recompute_modules) == ("selective", ["core_attn"])
    assert transformer_config_from_hf(hf_config).recompute_granularity is None
