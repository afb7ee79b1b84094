"""The main job learns: the README's quickstart, as shipped, raises the training reward.

The quickstart starts from a tiny random model after an SFT warm-up that teaches the answer format
only part of the time (its answers are shuffled between prompts, so it teaches nothing about which
answer is right); GRPO must then raise the reward on its own. A policy that does not learn keeps
the reward where the warm-up left it: its 10-step window means differ by sampling noise only
(about 0.06 standard deviation each at 64 responses per step), far below the margin asserted here.
"""

from _trainer_runs import run_train

from megatron_rl.trainer.metrics import read_metrics

MARGIN = 0.25


def test_quickstart_reward_rises(tmp_path):
    run_train(tmp_path, "trainer.progress_bar=false", "trainer.export_hf=false", timeout=1500)
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + MARGIN, (first, last, rewards)
