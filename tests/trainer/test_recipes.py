"""Every recipe in examples/ loads, and the trainer's config sections reject bad values by name."""

from pathlib import Path

import pytest

from megatron_rl.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.data.batch_size * cfg.rollout.n % cfg.algorithm.micro_batch_size == 0


def test_medu1_recipe_follows_the_paper():
    cfg = load_config(Path(EXAMPLES[0]).with_name("medu1_qwen2.5_3b.yaml"))
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.rollout.n, cfg.rollout.temperature) == (1e-6, 4, 8, 0.6)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_response_length) == (1024, 4096)
    assert (cfg.algorithm.kl_coef, cfg.algorithm.kl_kind, cfg.algorithm.entropy_coef) == (0.001, "low_var_kl", 0.001)
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.ppo_epochs) == (0.2, 0.2, 1)
    assert load_config(Path(EXAMPLES[0]).with_name("medu1_qwen2.5_7b.yaml")).parallel.tp == 2


@pytest.mark.parametrize(("override", "message"), [
    ("rollout.n=0", "rollout.n=0 must be >= 1"),
    ("algorithm.advantage=ppo", "algorithm.advantage='ppo' is not allowed"),
    ("trainer.resume=latest", "trainer.resume='latest' is not allowed"),
    ("algorithm.loss_agg=mean", "algorithm.loss_agg='mean' is not allowed"),
    ("data.builtin_tasks=hard", "data.builtin_tasks='hard' is not allowed"),
    ("trainer.totl_steps=3", "unknown config key 'trainer.totl_steps'"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])
