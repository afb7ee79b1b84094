"""Preparing raw benchmark files: readers, prompts, length budgets, splits, outputs, errors."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from megatron_rl.cli import main
from megatron_rl.data.prepare import (
    SYSTEM_PROMPT,
    LengthMode,
    PrepareOptions,
    detect_format,
    length_instruction,
    prepare,
    read_problems,
    split_of_file,
)
from megatron_rl.data.schema import read_rows

MEDU1_FILES = ("mediq", "medxpertqa", "medcalc", "huatuo")


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def user_text(row) -> str:
    return dict(row.messages)["user"]


# --- round trip on the shipped raw files ---------------------------------------------------


def test_raw_medu1_files_reproduce_the_shipped_parquet_row_for_row(medu1_dir: Path, tmp_path: Path) -> None:
    inputs = [medu1_dir / "raw" / f"{name}.json" for name in MEDU1_FILES]
    summary = prepare(inputs, tmp_path, PrepareOptions(seed=3))
    for name in MEDU1_FILES:
        ours, _ = read_rows(tmp_path / f"{name}.parquet")
        shipped, _ = read_rows(medu1_dir / f"{name}.parquet")
        assert summary.written[f"{name}.parquet"] == (name, "validation", len(shipped))
        assert len(ours) == len(shipped)
        for mine, theirs in zip(ours, shipped, strict=True):
            assert (mine.data_source, mine.ground_truth, mine.lower_limit, mine.upper_limit) == (
                theirs.data_source, theirs.ground_truth, theirs.lower_limit, theirs.upper_limit)
            # Same question and options: the shipped user turn starts with exactly our rendering.
            shipped_user = theirs.messages[0][1].split("<|im_start|>user\n", 1)[1]
            question = user_text(mine).split("  Please provide", 1)[0]
            assert shipped_user.split("  Please provide", 1)[0] == question
            assert 100 <= mine.num_tokens <= 2000 and f"Think for {mine.num_tokens} tokens." in user_text(mine)
        assert dict(ours[0].messages)["system"] == SYSTEM_PROMPT


# --- readers ------------------------------------------------------------------------------

PUBLIC_RECORDS = {
    "medcalc": {"Patient Note": "A 60 kg woman.", "Question": "What is her BMI?", "Ground Truth Answer": 22.5,
                "Lower Limit": "21.4", "Upper Limit": "23.6", "Calculator Name": "BMI"},
    "mediq": {"question": "Next step?", "context": ["A 30-year-old man.", "He is tired."],
              "options": {"A": "Rest", "B": "ACTH test"}, "answer": "ACTH test", "answer_idx": "B"},
    "medxpertqa": {"question": "Best treatment?", "options": {"A": "x", "B": "y", "C": "z"}, "label": "C",
                   "medical_task": "Treatment"},
    "huatuo": {"Question": "Symptoms of Gradenigo syndrome?", "Complex_CoT": "Think.", "Response": "Otorrhoea."},
    "ehrnoteqa": {"note_1": "Admitted with chest pain.", "question": "What was given?", "choice_A": "Aspirin",
                  "choice_B": "Heparin", "choice_C": "Nothing", "answer": "A"},
    "mmlu_pro": {"question": "Which vitamin?", "options": [f"option {i}" for i in range(10)], "answer": "J",
                 "answer_index": 9, "category": "health"},
}


@pytest.mark.parametrize("format_name", sorted(PUBLIC_RECORDS))
def test_public_release_layouts_are_recognised_and_read(tmp_path: Path, format_name: str) -> None:
    record = PUBLIC_RECORDS[format_name]
    assert detect_format(record) == format_name
    found, (problem,) = read_problems(write_json(tmp_path / "in.json", [record]))
    assert found == format_name
    if problem.options:  # multiple choice: the question, then one "Letter: text" line per option
        lines = problem.rendered_question().splitlines()
        assert lines[-len(problem.options):] == [f"{letter}: {text}" for letter, text in problem.options]
        assert problem.answer in dict(problem.options)
    expected_answers = {"medcalc": "22.5", "mediq": "B", "medxpertqa": "C", "huatuo": "Otorrhoea.",
                        "ehrnoteqa": "A", "mmlu_pro": "J"}
    assert problem.answer == expected_answers[format_name]


def test_mmlu_pro_letters_run_to_j(tmp_path: Path) -> None:
    _, (problem,) = read_problems(write_json(tmp_path / "mmlu.jsonl.json", [PUBLIC_RECORDS["mmlu_pro"]]))
    assert [letter for letter, _ in problem.options] == list("ABCDEFGHIJ")
    assert problem.rendered_question().endswith("\nJ: option 9")


def test_jsonl_and_parquet_inputs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [PUBLIC_RECORDS["huatuo"], {**PUBLIC_RECORDS["huatuo"], "Question": "Second?"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "b.parquet")
    for path in (tmp_path / "a.jsonl", tmp_path / "b.parquet"):
        _, problems = read_problems(path)
        assert [p.question for p in problems] == ["Symptoms of Gradenigo syndrome?", "Second?"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}, "answer 'E' is not one of the options A, B"),
        ({"problem": "q", "answer": "1", "Lower Limit": "0"}, None),  # readable: checked below
        ({"Question": "q", "Response": ""}, "field 'Response'=''"),
        ({"foo": 1}, "cannot tell the benchmark from fields ['foo']; pass --format"),
    ],
)
def test_bad_records_name_the_file_record_and_field(tmp_path: Path, record: dict, message: str | None) -> None:
    path = write_json(tmp_path / "bad.json", [record])
    if message is None:
        assert read_problems(path)[1][0].lower_limit == "0"
        return
    with pytest.raises(ValueError) as err:
        read_problems(path)
    assert message in str(err.value) and "bad.json" in str(err.value)


def test_unreadable_inputs(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: cannot read records"):
        read_problems(tmp_path / "broken.json")
    write_json(tmp_path / "scalars.json", [1, 2])
    with pytest.raises(ValueError, match="list of JSON objects"):
        read_problems(tmp_path / "scalars.json")
    with pytest.raises(ValueError, match=r"--format='gsm8k' is not allowed"):
        read_problems(write_json(tmp_path / "x.json", [PUBLIC_RECORDS["huatuo"]]), format_name="gsm8k")


# --- length budgets -----------------------------------------------------------------------


def draws(mode: LengthMode, n: int = 4000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [mode.draw(rng) for _ in range(n)]


def test_length_mode_distributions() -> None:
    exact = draws(LengthMode("exact"))
    assert min(exact) >= 100 and max(exact) <= 2000 and len(set(exact)) > 1000
    assert 900 < sum(exact) / len(exact) < 1200  # uniform mean 1050

    log = draws(LengthMode("log"))
    assert min(log) >= 256 and max(log) <= int(2**14.5)  # int(2 ** U(8, 14.5))
    assert 0.4 < sum(b < 2 ** 11.25 for b in log) / len(log) < 0.6  # the median exponent is 11.25

    both = draws(LengthMode("both"))
    assert set(both) - set(range(100, 2001)) == {-1}
    assert 0.45 < both.count(-1) / len(both) < 0.55

    both_both = draws(LengthMode("both_both"))
    assert all(100 <= abs(b) <= 2000 for b in both_both)
    assert 0.45 < sum(b < 0 for b in both_both) / len(both_both) < 0.55

    assert set(draws(LengthMode("normal"), 50)) == {-1}
    assert set(draws(LengthMode("fixed", -512), 50)) == {-512}
    assert draws(LengthMode("exact"), 50, seed=1) == draws(LengthMode("exact"), 50, seed=1)
    assert draws(LengthMode("exact"), 50, seed=1) != draws(LengthMode("exact"), 50, seed=2)


def test_length_instructions() -> None:
    assert length_instruction(700) == "Think for 700 tokens."
    assert length_instruction(-700) == "Think for maximum 700 tokens."
    assert length_instruction(-1) == ""
    with pytest.raises(ValueError, match="length.mode='short'"):
        LengthMode("short")
    with pytest.raises(ValueError, match="length.num_tokens=0"):
        LengthMode("fixed", 0)


def test_prompts_carry_the_budget_they_store(tmp_path: Path) -> None:
    raw = write_json(tmp_path / "train_q.json", [{**PUBLIC_RECORDS["huatuo"], "Question": f"Q{i}?"} for i in range(50)])
    for mode, expect in ((LengthMode("both_both"), None), (LengthMode("normal"), -1), (LengthMode("fixed", 300), 300)):
        prepare([raw], tmp_path / mode.mode, PrepareOptions(length=mode, seed=5))
        rows, _ = read_rows(tmp_path / mode.mode / "train_huatuo.parquet")
        for row in rows:
            assert expect is None or row.num_tokens == expect
            assert user_text(row).endswith(f"tags. {length_instruction(row.num_tokens)}")


# --- splits, names, deduplication, mix ----------------------------------------------------


def test_split_of_file_follows_medu1_names() -> None:
    assert split_of_file(Path("train_medoption.json")) == "train"
    assert split_of_file(Path("mediq_test.json")) == "test"
    assert split_of_file(Path("mediq.json")) == "validation"
    assert split_of_file(Path("contest_questions.json")) == "validation"  # "test" inside a word is no split


def mc(question: str, answer: str = "A", options_key: str = "options") -> dict:
    """A MediQ-release record, or with options_key='choices' a MedXpertQA raw one."""
    answer_key = "answer_idx" if options_key == "options" else "answer"
    return {"question": question, options_key: {"A": "yes", "B": "no"}, answer_key: answer}


def test_outputs_named_after_the_dataset_and_duplicates_dropped(tmp_path: Path) -> None:
    train = write_json(tmp_path / "train_mediq.json", [mc("Q1"), mc("Q2"), mc("shared question"), mc("Q3")])
    val = write_json(tmp_path / "mediq.json", [mc("Q4"), mc("Shared   QUESTION")])
    test = write_json(tmp_path / "mediq_test.json", [mc("shared question"), mc("Q5")])
    calc = write_json(tmp_path / "train_medcalc.json", [{"problem": "BMI?", "answer": "22", "Lower Limit": "21",
                                                       "Upper Limit": "23"}])
    summary = prepare([train, val, test, calc], tmp_path / "out", PrepareOptions(seed=0))
    assert summary.written["train_mediq.parquet"] == ("mediq", "train", 3)
    assert summary.written["mediq.parquet"] == ("mediq", "validation", 1)
    assert summary.written["mediq_test.parquet"] == ("mediq", "test", 2)
    assert summary.written["train_medcalc.parquet"] == ("medcalc", "train", 1)
    assert summary.duplicates_dropped == Counter({("mediq", "train"): 1, ("mediq", "validation"): 1})
    assert "dropped as duplicates of another split: 2" in summary.format()
    questions = {split: {user_text(r).split("\n")[0] for r in read_rows(tmp_path / "out" / f)[0]}
                 for f, (_, split, _) in summary.written.items() if "mediq" in f}
    assert questions["train"].isdisjoint(questions["test"]) and questions["validation"].isdisjoint(questions["test"])
    # The multiple-choice mix needs two multiple-choice sources: medcalc is numeric, so no mix here.
    assert "train_medoption.parquet" not in summary.written


def test_multiple_choice_mix_and_repeated_training_rows(tmp_path: Path) -> None:
    mediq = write_json(tmp_path / "train_a.json", [mc(f"A{i}") for i in range(10)])
    xpert = write_json(tmp_path / "train_b.json", [mc(f"B{i}", "B", "choices") for i in range(6)])
    options = PrepareOptions(seed=1, sample_multiple_for_train=3)
    summary = prepare([mediq, xpert], tmp_path / "out", options)
    assert summary.written["train_mediq.parquet"][2] == 30
    assert summary.written["train_medxpertqa.parquet"][2] == 18
    mix, _ = read_rows(tmp_path / "out" / "train_medoption.parquet")
    assert len(mix) == 48 and Counter(r.data_source for r in mix) == {"MedIQ": 30, "MedXpertQA": 18}
    assert [r.index for r in mix] == list(range(48))
    repeats, _ = read_rows(tmp_path / "out" / "train_mediq.parquet")
    budgets = [r.num_tokens for r in repeats if user_text(r).startswith("A0\n")]
    assert len(budgets) == 3 and len(set(budgets)) > 1  # fresh budget per repeat
    again = prepare([mediq, xpert], tmp_path / "again", options)
    assert again.written == summary.written
    assert read_rows(tmp_path / "again" / "train_medoption.parquet")[0] == mix  # seeded: reproducible


def test_split_override_and_record_split(tmp_path: Path) -> None:
    raw = write_json(tmp_path / "pool.json", [{**mc("Q1"), "split": "train"}, {**mc("Q2"), "split": "test"}, mc("Q3")])
    summary = prepare([raw], tmp_path / "a")
    assert {f: v[1:] for f, v in summary.written.items()} == {
        "train_mediq.parquet": ("train", 1), "mediq.parquet": ("validation", 1), "mediq_test.parquet": ("test", 1)}
    summary = prepare([raw], tmp_path / "b", PrepareOptions(split="test", name="my-set"))
    assert summary.written == {"my-set_test.parquet": ("my-set", "test", 3)}
    with pytest.raises(ValueError, match="--name='../x'"):
        PrepareOptions(name="../x")


# --- command line -------------------------------------------------------------------------


def test_cli_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_json(tmp_path / "train_h.json", [{**PUBLIC_RECORDS["huatuo"], "Question": f"Q{i}?"} for i in range(4)])
    out = tmp_path / "out"
    assert main(["prepare-data", "--input", str(raw), "--output-dir", str(out), "--num-tokens", "-800"]) == 0
    printed = capsys.readouterr().out
    assert "train_huatuo.parquet" in printed and "train" in printed and "4" in printed
    rows, _ = read_rows(out / "train_huatuo.parquet")
    assert {r.num_tokens for r in rows} == {-800}
    with pytest.raises(SystemExit):
        main(["prepare-data", "--input", str(raw), "--output-dir", str(out), "--do-normal", "--use-log"])
    assert main(["prepare-data", "--input", str(tmp_path / "missing.json"), "--output-dir", str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err


# --- the dataset reads our output as it reads the shipped files ---------------------------


def test_dataset_reads_our_output_and_the_shipped_files_identically(medu1_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from megatron_rl.data.dataset import PromptDataset
    from megatron_rl.data.schema import write_rows
    from megatron_rl.testing import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model(tmp_path / "tiny"))
    for name in ("mediq", "medcalc"):
        shipped, _ = read_rows(medu1_dir / f"{name}.parquet")
        _, problems = read_problems(medu1_dir / "raw" / f"{name}.json")
        # Our rows as chat messages, with the budget and system prompt each shipped row drew.
        ours = []
        for index, (problem, theirs) in enumerate(zip(problems, shipped, strict=True)):
            system = theirs.messages[0][1].split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
            ours.append(problem.to_row(theirs.num_tokens, "validation", index, system))
        write_rows(tmp_path / f"{name}.parquet", ours)
        mine = PromptDataset([tmp_path / f"{name}.parquet"], tokenizer, max_prompt_length=1 << 20)
        theirs = PromptDataset([medu1_dir / f"{name}.parquet"], tokenizer, max_prompt_length=1 << 20)
        assert len(mine) == len(theirs) == len(shipped)
        for a, b in zip(mine.examples, theirs.examples, strict=True):
            assert a.row.ground_truth == b.row.ground_truth
            assert a.prompt_text == b.prompt_text
            assert a.prompt_token_ids == b.prompt_token_ids
