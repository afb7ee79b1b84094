"""Validation with several samples per prompt (means over every sample, pass@k) and the run length in
epochs, on a trainer stand-in (no model: the engine answers from a table)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_rl.config import load_config
from megatron_rl.data.dataset import PromptExample, PromptSampler
from megatron_rl.data.schema import PromptRow
from megatron_rl.rollout.base import Rollout
from megatron_rl.trainer import phases
from megatron_rl.trainer.loop import Trainer

RIGHT, WRONG = "<think>x</think><answer>{}</answer>", "<think>x</think><answer>A</answer>"  # reward 2 / 0


class TableEngine:
    """Answers prompt i with ANSWERS[i] (one text per sample), each of 3 + i tokens."""

    def __init__(self, answers: list[list[str]]) -> None:
        self.answers = answers
        self.calls = []

    def generate(self, prompt_token_ids, sampling):
        self.calls.append(sampling)
        return [Rollout(i, j, (7,) * (3 + i), text, (0.0,) * (3 + i), "stop")
                for i in range(len(prompt_token_ids)) for j, text in enumerate(self.answers[i][: sampling.n])]


def _example(source: str, truth: str, index: int) -> PromptExample:
    row = PromptRow(source, (("user", f"question {index}"),), truth)
    return PromptExample(row, "val.parquet", index, f"question {index}", (1, 2, index + 3))


def _trainer(overrides: list[str], answers: list[list[str]]) -> SimpleNamespace:
    examples = [_example("MedIQ", "B", 0), _example("MedIQ", "B", 1), _example("MedXpertQA", "C", 2)]
    return SimpleNamespace(cfg=load_config(None, ["model.path=tiny", *overrides]),
                           val_set=SimpleNamespace(examples=examples), engine=TableEngine(answers))


def test_several_samples_per_prompt_give_means_over_every_sample_and_pass_at_k():
    """MedIQ prompt 0 right once in 4, prompt 1 never, the MedXpertQA prompt 4 times in 4."""
    b, c = RIGHT.format("B"), RIGHT.format("C")
    tr = _trainer(["rollout.val_n=4", "rollout.val_temperature=0.6", "rollout.max_response_length=64"],
                  [[b, WRONG, WRONG, WRONG], [WRONG] * 4, [c] * 4])
    metrics = phases.validate(tr)
    (sampling,) = tr.engine.calls
    assert (sampling.n, sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (4, 0.6, 1.0, -1, 64)
    assert metrics["val/test_acc/MedIQ"] == 1 / 8 and metrics["val/test_acc/MedXpertQA"] == 1.0
    assert metrics["val/test_acc/all"] == 5 / 12
    assert metrics["val/test_score/MedIQ"] == 2 / 8 and metrics["val/test_score/MedXpertQA"] == 2.0
    assert metrics["val/response_length/mean"] == (4 * 3 + 4 * 4 + 4 * 5) / 12
    # pass@2 of a prompt right once in 4: 1 - C(3,2)/C(4,2) = 1/2; pass@4: 1
    assert (metrics["val/pass@2/MedIQ"], metrics["val/pass@2/MedXpertQA"], metrics["val/pass@2/all"]) == (
        pytest.approx(1 / 4), 1.0, pytest.approx(1 / 2))
    assert (metrics["val/pass@4/MedIQ"], metrics["val/pass@4/MedXpertQA"], metrics["val/pass@4/all"]) == (
        0.5, 1.0, pytest.approx(2 / 3))
    assert not [key for key in metrics if key.startswith("val/pass@1/")]  # pass@1 is test_acc


def test_one_greedy_sample_per_prompt_by_default():
    tr = _trainer([], [[RIGHT.format("B")], [WRONG], [WRONG]])
    metrics = phases.validate(tr)
    assert (tr.engine.calls[0].n, tr.engine.calls[0].temperature) == (1, 0.0)
    assert metrics["val/test_acc/MedIQ"] == 0.5 and metrics["val/test_acc/MedXpertQA"] == 0.0
    assert not [key for key in metrics if key.startswith("val/pass@")]


@pytest.mark.parametrize(("overrides", "steps", "said"), [
    (["trainer.total_epochs=1"], 1266, "run length: 1266 steps (trainer.total_epochs=1 x 1266 batches of 4 prompts "
     "per epoch: 5066 training prompts, 2 left out of each epoch by data.drop_last)"),
    (["trainer.total_epochs=2", "data.drop_last=false"], 2534, "run length: 2534 steps (trainer.total_epochs=2 x "
     "1267 batches of 4 prompts per epoch: 5066 training prompts, 0 left out of each epoch by data.drop_last)"),
    (["trainer.total_steps=30"], 30, "run length: 30 steps (trainer.total_steps; 1266 batches"),
])
def test_run_length_in_epochs_counts_whole_batches(overrides, steps, said):
    cfg = load_config(None, ["model.path=tiny", "data.batch_size=4", *overrides])
    tr = SimpleNamespace(cfg=cfg, train_set=[None] * 5066, sampler=PromptSampler.from_config(5066, cfg.data))
    assert Trainer.total_steps(tr) == steps
    assert Trainer._run_length(tr, steps).startswith(said)
