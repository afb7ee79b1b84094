"""A CPU stand-in for a rollout engine in the evaluation tests: it answers from a script instead of
a model, so the tests know which samples are right, and counts the prompts it was asked for."""

from __future__ import annotations

import time

from megatron_rl.rollout.base import Rollout, SamplingConfig


class ScriptedEngine:
    """Sample j of a prompt is correct when ``(len(prompt ids) + j) % 3 == 0``: the ground truth in
    <answer> tags, or bare (no tags) when j is odd (the evaluation then scores the whole response);
    otherwise a wrong answer. Sample j has 10 + 7 j tokens.

    Args:
        truths: prompt token ids -> that row's ground truth.
        fail_after_calls: raise RuntimeError on generate call number ``fail_after_calls + 1``
            (a fault in the middle of a run); None never fails.
        delay_s: sleep this long in every generate call (to be killed mid-run).
    """

    def __init__(self, truths: dict[tuple[int, ...], str], *, fail_after_calls: int | None = None,
                 delay_s: float = 0.0) -> None:
        self.truths = truths
        self.fail_after_calls = fail_after_calls
        self.delay_s = delay_s
        self.calls = 0
        self.prompts_generated: list[tuple[int, ...]] = []

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError(f"scripted fault after {self.calls} generate calls")
        self.calls += 1
        time.sleep(self.delay_s)
        rollouts = []
        for i, ids in enumerate(prompt_token_ids):
            self.prompts_generated.append(tuple(ids))
            truth = self.truths[tuple(ids)]
            for j in range(sampling.n):
                if (len(ids) + j) % 3 == 0:
                    text = truth if j % 2 else f"<think>checked</think><answer>{truth}</answer>"
                else:
                    text = "<think>guess</think><answer>Z 0 nothing</answer>"
                count = 10 + 7 * j
                rollouts.append(Rollout(i, j, tuple(range(count)), text, (-0.5,) * count, "stop"))
        return rollouts

    def load_weights(self, weights) -> None:
        raise NotImplementedError("the scripted engine has no weights")

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        pass


def truths_for(config) -> dict[tuple[int, ...], str]:
    """Prompt token ids -> ground truth for every prompt of an evaluation config."""
    from transformers import AutoTokenizer

    from megatron_rl.evaluation.runner import build_prompts

    prompts = build_prompts(config, AutoTokenizer.from_pretrained(config.model))
    return {p.token_ids: p.row.ground_truth for p in prompts}
