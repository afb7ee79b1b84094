"""What a step tells its user besides the metrics: the equal-reward warning and count, and the responses
written to RUN_DIR/generations.jsonl, on a trainer stand-in (no model: the engine answers from a table)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from megatron_rl.config import load_config
from megatron_rl.data.dataset import PromptExample
from megatron_rl.data.schema import PromptRow
from megatron_rl.jsonl import append_records
from megatron_rl.rollout.base import Rollout
from megatron_rl.trainer import phases
from megatron_rl.trainer.loop import Trainer
from megatron_rl.trainer.metrics import GENERATIONS_FILE

RIGHT = "<think>x</think><answer>B</answer>"  # format +1, correct +1: reward 2
WRONG = "<think>x</think><answer>A</answer>"  # format +1, wrong -1: reward 0
NO_FORMAT = "B"  # no answer tag: format -1, missing answer -2: reward -3


class TableEngine:
    """Answers the k-th prompt it is ever asked with ANSWERS[k] (one text per sample), 4 tokens each."""

    def __init__(self, answers: list[list[str]]) -> None:
        self.answers = answers
        self.asked = 0

    def generate(self, prompt_token_ids, sampling):
        rollouts = []
        for i in range(len(prompt_token_ids)):
            texts = self.answers[self.asked % len(self.answers)]
            self.asked += 1
            rollouts += [Rollout(i, j, (7, 7, 7, 7), text, (0.0,) * 4, "stop") for j, text in enumerate(texts)]
        return rollouts


def _trainer(tmp_path, answers: list[list[str]], overrides: list[str]) -> SimpleNamespace:
    examples = [PromptExample(PromptRow("MedIQ", (("user", f"question {i}"),), "B"), "/data/train.parquet", i,
                              f"<prompt {i}>", (1, 2, i + 3)) for i in range(8)]
    cfg = load_config(None, ["model.path=tiny", "data.batch_size=2", "rollout.n=2", *overrides])
    return SimpleNamespace(cfg=cfg, info=SimpleNamespace(dp_size=1, dp_rank=0), is_main=True, run_dir=tmp_path,
                           sampler=Batches(), engine=TableEngine(answers),
                           tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=0),
                           local_prompts=lambda indices: [examples[i] for i in indices])


class Batches:
    """A sampler stand-in: batches [0, 1], [2, 3], ... (the trainer takes ``next(iter(sampler))``)."""

    def __init__(self) -> None:
        self.next = 0

    def __iter__(self):
        self.next += 2
        return iter([[self.next - 2, self.next - 1]])


def _run(tr, step: int = 1) -> dict[str, float]:
    _, metrics = phases.generate_and_score(tr, step, phases.PhaseTimer())
    return metrics


def test_a_step_whose_groups_all_have_equal_rewards_is_counted_and_warned_about(tmp_path, caplog):
    tr = _trainer(tmp_path, [[NO_FORMAT, NO_FORMAT]], ["algorithm.kl_coef=0", "algorithm.entropy_coef=0"])
    with caplog.at_level(logging.WARNING, logger="megatron_rl.trainer.phases"):
        metrics = _run(tr, step=3)
    assert metrics["sampling/equal_reward_groups"] == 2.0 and metrics["reward/mean"] == -3.0
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "step 3: each of the 2 groups has equal rewards (every reward is -3), so every advantage is 0: the update "
        "costs a full step and changes the policy not at all.")
    assert "trainer.sft_warmup_steps" in record.getMessage()

    caplog.clear()  # with a KL term the policy still moves, towards the reference
    tr = _trainer(tmp_path, [[RIGHT, RIGHT], [WRONG, WRONG]], ["algorithm.kl_coef=0.01", "algorithm.entropy_coef=0"])
    with caplog.at_level(logging.WARNING, logger="megatron_rl.trainer.phases"):
        assert _run(tr)["sampling/equal_reward_groups"] == 2.0
    assert "(rewards 0, 2)" in caplog.text and "only through the KL and entropy terms" in caplog.text


def test_a_step_with_one_group_to_learn_from_is_counted_but_not_warned_about(tmp_path, caplog):
    tr = _trainer(tmp_path, [[RIGHT, WRONG], [WRONG, WRONG]], [])
    with caplog.at_level(logging.WARNING, logger="megatron_rl.trainer.phases"):
        metrics = _run(tr)
    assert metrics["sampling/equal_reward_groups"] == 1.0 and not caplog.records


def test_dynamic_sampling_counts_the_equal_groups_of_every_round(tmp_path, caplog):
    # round 1: prompts 0 (equal) and 1 (mixed); round 2: prompts 2 (equal) and 3 (mixed): batch full
    tr = _trainer(tmp_path, [[WRONG, WRONG], [RIGHT, WRONG]],
                  ["algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=3"])
    with caplog.at_level(logging.WARNING, logger="megatron_rl.trainer.phases"):
        metrics = _run(tr)
    assert (metrics["sampling/rounds"], metrics["sampling/equal_reward_groups"]) == (2.0, 2.0)
    assert not caplog.records  # the batch trained on has two mixed groups
    assert phases.equal_reward_groups([1.0, 1.0, 0.0, 2.0, -3.0, -3.0], 2) == 2


def test_a_few_responses_per_step_are_written_to_the_run_directory(tmp_path):
    tr = _trainer(tmp_path, [[RIGHT, WRONG], [NO_FORMAT, WRONG]], ["trainer.log_generations=3"])
    _run(tr, step=1)
    _run(tr, step=2)
    records = [json.loads(line) for line in (tmp_path / GENERATIONS_FILE).read_text().splitlines()]
    assert [(r["step"], r["row_index"], r["sample_index"]) for r in records] == [
        (1, 0, 0), (1, 1, 0), (1, 0, 1), (2, 2, 0), (2, 3, 0), (2, 2, 1)]  # sample 0 of each prompt first
    first = records[0]
    assert first == {"step": 1, "file": "train.parquet", "row_index": 0, "data_source": "MedIQ", "sample_index": 0,
                     "prompt": "<prompt 0>", "response": RIGHT, "reward": 2.0, "format": 1.0, "correctness": 1.0,
                     "length": 0.0, "answer": "B", "ground_truth": "B", "response_num_tokens": 4,
                     "finish_reason": "stop"}
    assert records[1]["reward"] == -3.0 and records[1]["answer"] is None

    quiet = _trainer(tmp_path / "none", [[RIGHT, WRONG]], ["trainer.log_generations=0"])
    (tmp_path / "none").mkdir()
    _run(quiet)
    assert not (tmp_path / "none" / GENERATIONS_FILE).exists()
    with pytest.raises(ValueError, match="trainer.log_generations=-1 must be >= 0"):
        load_config(None, ["trainer.log_generations=-1"])


def test_a_resumed_run_keeps_each_steps_responses_once(tmp_path, capsys):
    path = tmp_path / GENERATIONS_FILE
    append_records(path, [{"step": s, "response": f"r{s}"} for s in (1, 1, 2, 3)])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 4, "resp')  # a kill mid-write
    Trainer._drop_records_after(SimpleNamespace(is_main=True, run_dir=tmp_path), 2)  # resumed from step 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 1, 2]
    assert f"{path}: 1 lines of steps after 2 dropped" in capsys.readouterr().out  # step 3; the partial line too


def test_the_own_model_example_is_set_for_a_pretrained_model_and_its_command_loads():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "my_model.yaml"
    header = [line.lstrip("# ").rstrip(" \\") for line in example.read_text().splitlines()[1:4]]
    command = " ".join(header).split()
    assert command[:3] == ["megatron-rl", "train", "examples/my_model.yaml"]
    overrides = [item.strip("'") for item in command[3:]]
    cfg = load_config(example, overrides)  # the documented command, as the shell passes it
    assert cfg.model.path == "/path/to/hf_model" and cfg.data.train_files == ("/path/to/train.parquet",)
    assert 1e-6 <= cfg.optim.lr <= 5e-6 and cfg.trainer.sft_lr <= 2e-5  # not the quickstart's 2e-4 / 3e-3
    assert cfg.trainer.sft_warmup_steps > 0 and cfg.data.max_prompt_length >= 2048
    assert cfg.data.builtin_tasks == "" and cfg.trainer.log_generations > 0
