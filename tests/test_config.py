"""YAML + dotted overrides fill the typed config; every mistake is a ValueError naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rl.config import Config, load_config, to_yaml
from megatron_rl.rewards import RewardConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_come_from_the_component_dataclasses() -> None:
    assert load_config() == Config(reward=RewardConfig())


def test_yaml_base_then_file_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("reward:\n  threshold: 30\n  scale: 10\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nreward:\n  threshold: 40\n")
    cfg = load_config(tmp_path / "run.yaml", ["reward.reward_type=continuous"])
    assert cfg.reward.scale == 10  # from the base
    assert cfg.reward.threshold == 40  # the file overrides its base
    assert cfg.reward.reward_type == "continuous"  # the command line overrides the file
    assert load_config(tmp_path / "run.yaml", ["reward.threshold=55"]).reward.threshold == 55


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.treshold=50"], r"unknown config key 'reward.treshold'; reward accepts: .*threshold"),
        (["rewards.threshold=50"], r"unknown config key 'rewards'; the top level accepts: algorithm, cluster, critic, data, memory, model, optim, parallel, reward, rollout, trainer"),
        (["reward.threshold=high"], r"reward.threshold: Value 'high'"),
        (["reward.check_think=maybe"], r"reward.check_think"),
        (["reward.reward_type=binary"], r"reward.reward_type='binary' is not allowed; choose one of 'discrete', 'continuous'"),
        (["reward.threshold"], r"override 'reward.threshold' must look like section.field=value"),
        (["rollout.cpu_gemm=fast"], r"rollout.cpu_gemm='fast' is not allowed; choose one of 'plain', 'packed'"),
    ],
)
def test_bad_overrides_name_the_key_and_value(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(overrides=["reward.bleu_percent=true", "reward.l1_alpha=0.001"])
    (tmp_path / "resolved.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("recipe", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_recipe_loads(recipe: Path) -> None:
    assert isinstance(load_config(recipe), Config)
