"""Built-in tasks: formulas by hand, rows that the schema and the reward accept, determinism."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest

from megatron_rl.cli import main
from megatron_rl.data import builtin
from megatron_rl.data.builtin import make_tasks, sft_examples
from megatron_rl.data.prepare import SYSTEM_PROMPT, TASK_INSTRUCTIONS
from megatron_rl.data.schema import read_rows
from megatron_rl.rewards.score import CHOICE, NUMERIC, TASK_OF_SOURCE, parse_number, score
from megatron_rl.testing import build_tokenizer

# --- formulas, each checked by hand ------------------------------------------------------------


def test_body_mass_index() -> None:
    # 70 kg / 1.75² m² = 70 / 3.0625 = 22.857...
    assert builtin.body_mass_index(70, 175) == pytest.approx(22.857142857)


def test_mean_arterial_pressure() -> None:
    # (120 + 2 * 80) / 3 = 280 / 3 = 93.33...
    assert builtin.mean_arterial_pressure(120, 80) == pytest.approx(93.333333333)


def test_anion_gap() -> None:
    # 140 - (104 + 24) = 12
    assert builtin.anion_gap(140, 104, 24) == 12


def test_creatinine_clearance() -> None:
    # man: (140 - 60) * 72 / (72 * 1.0) = 80; woman: 80 * 0.85 = 68
    assert builtin.creatinine_clearance(60, 72, 1.0, female=False) == pytest.approx(80)
    assert builtin.creatinine_clearance(60, 72, 1.0, female=True) == pytest.approx(68)
    # (140 - 40) * 60 / (72 * 1.5) = 6000 / 108 = 55.555...
    assert builtin.creatinine_clearance(40, 60, 1.5, female=False) == pytest.approx(55.555555556)


def test_corrected_calcium() -> None:
    # 8.0 + 0.8 * (4 - 2.0) = 9.6; albumin above 4 lowers it: 9.0 + 0.8 * (4 - 4.5) = 8.6
    assert builtin.corrected_calcium(8.0, 2.0) == pytest.approx(9.6)
    assert builtin.corrected_calcium(9.0, 4.5) == pytest.approx(8.6)


def test_qtc_bazett() -> None:
    # HR 60: RR = 1 s, QTc = 400; HR 100: RR = 0.6 s, 400 / sqrt(0.6) = 400 / 0.774597 = 516.398...
    assert builtin.qtc_bazett(400, 60) == pytest.approx(400)
    assert builtin.qtc_bazett(400, 100) == pytest.approx(516.397779)


def test_ideal_body_weight() -> None:
    # 177.8 cm = 70 in: man 50 + 2.3 * 10 = 73; 152.4 cm = 60 in: woman 45.5 + 0 = 45.5
    assert builtin.ideal_body_weight(177.8, female=False) == pytest.approx(73)
    assert builtin.ideal_body_weight(152.4, female=True) == pytest.approx(45.5)


def test_ldl_friedewald() -> None:
    # 200 - 50 - 150 / 5 = 200 - 50 - 30 = 120
    assert builtin.ldl_friedewald(200, 50, 150) == pytest.approx(120)


def test_free_water_deficit() -> None:
    # man of 40: 0.6 * 70 * (154 / 140 - 1) = 42 * 0.1 = 4.2
    assert builtin.free_water_deficit(154, 70, 40, female=False) == pytest.approx(4.2)
    # woman of 70: 0.45 * 60 * (147 / 140 - 1) = 27 * 0.05 = 1.35
    assert builtin.free_water_deficit(147, 60, 70, female=True) == pytest.approx(1.35)


def test_serum_osmolality() -> None:
    # 2 * 140 + 28 / 2.8 + 90 / 18 = 280 + 10 + 5 = 295
    assert builtin.serum_osmolality(140, 28, 90) == pytest.approx(295)


def test_point_score_counts_the_criteria_met() -> None:
    assert builtin.point_score([True, False, True, True, False]) == 3


def test_numbers_and_limits() -> None:
    assert builtin.format_number(22.857142) == "22.86"
    assert builtin.format_number(80.0) == "80"
    # 120 ± 5 % = 114 .. 126
    assert builtin.numeric_limits(120.0) == ("114.000", "126.000")


def test_every_calculator_answer_differs_from_its_mistakes() -> None:
    import random

    rng = random.Random(1)
    for calculator in builtin.CALCULATORS:
        for _ in range(20):
            inputs = calculator.draw(rng)
            answer = calculator.compute(inputs)
            assert answer > 0, (calculator.name, inputs)
            assert len(builtin._distinct_values(answer, calculator.mistakes(inputs))) == 3


# --- generated rows ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=builtin.DIFFICULTIES)
def generated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp(request.param)
    paths = make_tasks(out, num_train=600, num_test=64, seed=7, difficulty=request.param)
    return request.param, {split: read_rows(path)[0] for split, path in paths.items()}


def options_of(row) -> dict[str, str]:
    return dict(re.findall(r"^([A-D]): (.+?)(?:  .*)?$", row.messages[-1][1], flags=re.MULTILINE))


def test_rows_pass_the_schema_with_the_asked_counts_and_sources(generated) -> None:
    _, rows = generated
    assert {split: len(split_rows) for split, split_rows in rows.items()} == {"train": 600, "test": 64}
    for split, split_rows in rows.items():
        assert [row.index for row in split_rows] == list(range(len(split_rows)))
        assert {row.split for row in split_rows} == {split}
        counts = Counter(row.data_source for row in split_rows)
        assert counts[builtin.CALC_SOURCE] == counts[builtin.CHOICE_SOURCE] == len(split_rows) // 2


def test_no_question_repeats_within_or_across_splits(generated) -> None:
    _, rows = generated
    questions = [row.messages[-1][1] for split_rows in rows.values() for row in split_rows]
    assert len(set(questions)) == len(questions)


def test_ideal_responses_score_one_and_wrong_answers_zero(generated) -> None:
    _, rows = generated
    all_rows = rows["train"] + rows["test"]
    for row, (messages, response) in zip(all_rows, sft_examples(all_rows), strict=True):
        assert [(m["role"], m["content"]) for m in messages] == list(row.messages)
        kwargs = {"lower_limit": row.lower_limit, "upper_limit": row.upper_limit, "num_tokens": row.num_tokens}
        right = score(row.data_source, response, row.ground_truth, **kwargs)
        assert (right.format, right.correctness, right.valid) == (1.0, 1.0, 1), (row, response)
        if TASK_OF_SOURCE[row.data_source] == CHOICE:
            wrong_answer = next(letter for letter in "ABCD" if letter != row.ground_truth)
        else:
            wrong_answer = builtin.format_number(float(row.upper_limit) * 1.1 + 1)
        wrong = score(row.data_source, response.replace(f">{row.ground_truth}<", f">{wrong_answer}<"),
                      row.ground_truth, **kwargs)
        assert (wrong.format, wrong.correctness, wrong.valid) == (1.0, -1.0, 0), (row, wrong_answer)


def test_numeric_limits_contain_the_answer(generated) -> None:
    difficulty, rows = generated
    for row in rows["train"]:
        if row.data_source != builtin.CALC_SOURCE:
            continue
        lower, truth, upper = (parse_number(value) for value in (row.lower_limit, row.ground_truth, row.upper_limit))
        assert lower <= truth <= upper
        if difficulty == "standard":  # ±5 %, so a strict margin around every (positive) answer
            assert lower == pytest.approx(truth * 0.95, abs=1e-3) and upper == pytest.approx(truth * 1.05, abs=1e-3)
        else:  # point scores are exact: the count of criteria answered yes
            assert lower == truth == upper == row.messages[-1][1].count(" yes")


def test_choice_rows_have_four_distinct_options_and_balanced_letters(generated) -> None:
    difficulty, rows = generated
    choice_rows = [row for row in rows["train"] if row.data_source == builtin.CHOICE_SOURCE]
    letters = Counter(row.ground_truth for row in choice_rows)
    assert sorted(letters) == list("ABCD")
    for count in letters.values():  # 300 rows: 75 each expected, sd 7.5
        assert 0.18 * len(choice_rows) <= count <= 0.32 * len(choice_rows), letters
    for row in choice_rows:
        options = options_of(row)
        assert sorted(options) == list("ABCD") and len(set(options.values())) == 4, row
        ((_, response),) = sft_examples([row])  # quotes the correct option
        assert response.startswith(f"<think>{options[row.ground_truth]} is option {row.ground_truth}.</think>")
        if difficulty == "easy":  # the options are the score's bands in order; the right one holds the yes count
            name = row.messages[-1][1].split(":", 1)[0]
            bands = next(score.bands for score in builtin.POINT_SCORES if score.name == name)
            assert list(options.values()) == ["-".join(map(str, band)) for band in bands]
            assert row.messages[-1][1].count(" yes") in bands["ABCD".index(row.ground_truth)], row
        else:  # distractors are more than 5 % away from the answer
            values = [float(text) for text in options.values()]
            correct = float(options[row.ground_truth])
            assert all(abs(v - correct) > 0.05 * correct for v in values if v != correct), options


def test_prompts(generated) -> None:
    difficulty, rows = generated
    row = rows["test"][0]
    task = TASK_OF_SOURCE[row.data_source]
    if difficulty == "standard":  # Med-U1's system prompt and answer instruction, no length instruction
        assert row.messages[0] == ("system", SYSTEM_PROMPT)
        assert row.messages[1][1].endswith(f"  {TASK_INSTRUCTIONS[task]} ")
        return
    tokenizer = build_tokenizer()
    lengths = []
    for row in rows["train"] + rows["test"]:
        messages = [{"role": role, "content": content} for role, content in row.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    assert max(lengths) <= 125, max(lengths)  # measured: 74-121


def test_easy_and_standard_ask_for_their_task() -> None:
    assert builtin.EASY_INSTRUCTIONS.keys() == {CHOICE, NUMERIC}
    assert TASK_OF_SOURCE[builtin.CALC_SOURCE] == NUMERIC and TASK_OF_SOURCE[builtin.CHOICE_SOURCE] == CHOICE


# --- determinism, options, errors, CLI ------------------------------------------------------------


def test_same_seed_same_rows_and_another_seed_other_rows(tmp_path: Path) -> None:
    first = make_tasks(tmp_path / "a", num_train=40, num_test=8, seed=3)
    again = make_tasks(tmp_path / "b", num_train=40, num_test=8, seed=3)
    other = make_tasks(tmp_path / "c", num_train=40, num_test=8, seed=4)
    for split in ("train", "test"):
        assert read_rows(first[split])[0] == read_rows(again[split])[0]
        assert read_rows(first[split])[0] != read_rows(other[split])[0]
    assert first == {"train": tmp_path / "a" / "train_builtin_easy.parquet",
                     "test": tmp_path / "a" / "builtin_easy_test.parquet"}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["builtin_easy_test.parquet",
                                                                 "train_builtin_easy.parquet"]


def test_one_kind_only(tmp_path: Path) -> None:
    paths = make_tasks(tmp_path, num_train=10, num_test=4, kinds=("choice",))
    assert {row.data_source for row in read_rows(paths["train"])[0]} == {builtin.CHOICE_SOURCE}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ("calc", "essay")}, "kinds='essay'"),
        ({"kinds": ()}, "kinds=()"),
        ({"difficulty": "hard"}, "difficulty='hard'"),
        ({"num_train": 0}, "num_train"),
        ({"num_train": 5000, "kinds": ("calc",)}, "num_train=5000"),
    ],
)
def test_bad_arguments_raise_naming_them(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_tasks(tmp_path, **{"num_test": 4, **kwargs})


def test_sft_example_is_short_and_tagged() -> None:
    row = builtin._row(builtin.Problem(builtin.CHOICE_SOURCE, "Q?", "C", (("A", "1"), ("B", "2"), ("C", "3"))),
                       "easy", "train", 0)
    ((messages, response),) = sft_examples([row])
    assert response == "<think>3 is option C.</think><answer>C</answer>"
    assert messages[0] == {"role": "system", "content": builtin.EASY_SYSTEM_PROMPT}
    assert math.isclose(score(row.data_source, response, "C").total, 2.0)
    # A multiple-choice row whose options are not "Letter: text" lines: no option text to quote.
    bare = builtin._row(builtin.Problem(builtin.CHOICE_SOURCE, "Q? (A) 1 (B) 2", "B"), "easy", "train", 0)
    assert sft_examples([bare])[0][1] == "<think>The correct option is B.</think><answer>B</answer>"


def test_cli_make_tasks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["make-tasks", "--output-dir", str(tmp_path), "--num-train", "6", "--num-test", "2",
                 "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    train, _ = read_rows(tmp_path / "train_builtin_easy.parquet")
    assert len(train) == 6 and str(tmp_path / "train_builtin_easy.parquet") in printed
    assert main(["make-tasks", "--output-dir", str(tmp_path), "--difficulty", "hard"]) == 2
    assert "difficulty='hard'" in capsys.readouterr().err
