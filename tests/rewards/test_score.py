"""Every rule of the Med-U1 reward, with numbers a person can check."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.rewards import RewardConfig, extract, score

WELL = "<think>reasoning</think><answer>{}</answer>"


# --- answer extraction and format ---------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("<answer>A</answer> then <answer> B \n</answer>", "B"),  # the last match, stripped
        ("<answer>\nline one\nline two\n</answer>", "line one\nline two"),  # dot matches newlines
        ("<answer><answer>x</answer>", "<answer>x"),  # a match runs to the first closing tag
        ("<answer>A</answer></answer>", "A"),
        ("<answer>   </answer>", None),  # empty counts as missing
        ("<answer>A", None),
        ("no tags", None),
    ],
)
def test_tagged_answer(response: str, answer: str | None) -> None:
    assert extract.tagged_answer(response) == answer


_FRAGMENTS = st.lists(st.sampled_from(["<answer>", "</answer>", "x", " ", "\n", "<", "answer>", "</", "<answer", "/"]),
                      max_size=40)


@settings(max_examples=3000, deadline=None)
@given(_FRAGMENTS)
def test_tagged_answer_matches_the_regex_definition(parts: list[str]) -> None:
    response = "".join(parts)
    matches = list(re.finditer(r"<answer>(.*?)</answer>", response, re.DOTALL))
    expected = (matches[-1].group(1).strip() or None) if matches else None
    assert extract.tagged_answer(response) == expected


_FORMAT_FRAGMENTS = st.lists(st.sampled_from(list(extract.FORMAT_TAGS) + ["x", "<", "think>", "</"]), max_size=12)


@settings(max_examples=2000, deadline=None)
@given(_FORMAT_FRAGMENTS)
def test_format_check_matches_its_definition(parts: list[str]) -> None:
    response = "".join(parts)
    positions = [response.find(tag) for tag in extract.FORMAT_TAGS]
    once = all(response.count(tag) == 1 for tag in extract.FORMAT_TAGS)
    assert extract.has_think_answer_format(response) == (once and positions == sorted(positions))


@pytest.mark.parametrize(
    ("response", "well_formed"),
    [
        ("<think>a</think><answer>B</answer>", True),
        ("<think>a</think>\n\n<answer>B</answer>", True),
        ("<answer>B</answer><think>a</think>", False),  # out of order
        ("<think>a</think><think>b</think><answer>B</answer>", False),  # a tag twice
        ("<think>a<answer>B</answer></think>", False),  # </think> after <answer>
        ("<answer>B</answer>", False),
    ],
)
def test_format(response: str, well_formed: bool) -> None:
    assert score("MedIQ", response, "B").format == (1.0 if well_formed else -1.0)


def test_format_without_think_check_needs_only_an_answer() -> None:
    no_think = RewardConfig(check_think=False)
    assert score("MedIQ", "<answer>B</answer>", "B", config=no_think).format == 1.0
    assert score("MedIQ", "<answer> </answer>", "B", config=no_think).format == -1.0  # empty = missing
    assert score("MedIQ", "B", "B", config=no_think).format == -1.0


# --- multiple choice ----------------------------------------------------------------------


def test_multiple_choice() -> None:
    right = score("MedXpertQA", WELL.format("J"), "J")
    assert (right.total, right.format, right.correctness, right.length, right.answer, right.valid) == (2, 1, 1, 0, "J", 1)
    wrong = score("MedXpertQA", WELL.format("I"), "J")
    assert (wrong.total, wrong.correctness, wrong.valid) == (0, -1, 0)
    missing = score("MedXpertQA", "<think>J</think>", "J")
    assert (missing.total, missing.format, missing.correctness, missing.valid) == (-3, -1, -2, 0)


def test_multiple_choice_exact_vs_lenient() -> None:
    for written in ("(C)", "C.", "C: Start hydrocortisone", "Option C", "**C**", "The answer is C"):
        assert score("MedIQ", WELL.format(written), "C").correctness == -1.0, written
        lenient = score("MedIQ", WELL.format(written), "C", config=RewardConfig(choice_parsing="lenient"))
        assert (lenient.correctness, lenient.answer, lenient.valid) == (1.0, "C", 1), written
    # Lenient parsing must not read a leading article or word as a letter.
    lenient = RewardConfig(choice_parsing="lenient")
    assert score("MedIQ", WELL.format("a fever"), "A", config=lenient).correctness == -1.0
    assert score("MedIQ", WELL.format("Cortisol"), "C", config=lenient).correctness == -1.0


def test_multiple_choice_ground_truth_that_is_no_letter_gives_zero() -> None:
    result = score("MMLU-Pro", WELL.format("yes"), "yes")
    assert (result.correctness, result.valid) == (0.0, 1)
    assert score("MMLU-Pro", WELL.format("O"), "O").correctness == 0.0  # letters stop at N


# --- MedCalc ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "correct"),
    [
        ("23.9761", True),  # the lower limit itself (inclusive)
        ("26.4999", True),  # the upper limit itself
        ("26.5", False),
        ("2.5e1", True),  # parsed as Python's float() does
        ("+25", True),
        ("25.", True),
        ("25 kg/m^2", False),  # units do not parse
        ("25%", False),
        ("2,5", False),
        ("nan", False),
    ],
)
def test_medcalc_numeric(answer: str, correct: bool) -> None:
    result = score("MedCalc-Bench", WELL.format(answer), "25.238", lower_limit="23.9761", upper_limit="26.4999")
    assert (result.correctness, result.valid) == ((1.0, 1) if correct else (-1.0, 0))


def test_medcalc_dates_and_tuples_match_exactly() -> None:
    assert score("MedCalc-Bench", WELL.format("09/23/2014"), "09/23/2014").correctness == 1.0
    assert score("MedCalc-Bench", WELL.format("9/23/2014"), "09/23/2014").correctness == -1.0
    weeks = "('32 weeks', '3 days')"
    assert score("MedCalc-Bench", WELL.format(weeks), weeks).correctness == 1.0
    assert score("MedCalc-Bench", WELL.format("(32 weeks, 3 days)"), weeks).correctness == -1.0


def test_medcalc_missing_limits_fall_back_to_the_ground_truth() -> None:
    assert score("MedCalc-Bench", WELL.format("7.0"), "7").correctness == 1.0
    assert score("MedCalc-Bench", WELL.format("7.1"), "7", lower_limit="n/a").correctness == -1.0


# --- length -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "used", "length"),
    [
        (1000, 1000, 1.0),  # exact: 1 - |n - N| / 1500
        (1000, 1300, 0.8),
        (1000, 700, 0.8),
        (1000, 3000, 1 - 2000 / 1500),
        (1000, 9000, -1.0),  # clipped
        (-500, 300, 0.4),  # max: (N - n) / 500
        (-500, 0, 1.0),
        (-500, 750, -0.5),
        (-500, 5000, -1.0),  # clipped
    ],
)
def test_length(num_tokens: int, used: int, length: float) -> None:
    result = score("MedIQ", WELL.format("A"), "A", num_tokens=num_tokens, response_num_tokens=used)
    assert result.length == pytest.approx(length)
    assert result.total == pytest.approx(1 + 1 + length)


def test_length_needs_an_answer_and_a_length_controlled_row() -> None:
    assert score("MedIQ", "<think>x</think>", "A", num_tokens=100, response_num_tokens=100).length == 0.0
    assert score("MedIQ", WELL.format("A"), "A", num_tokens=-1, response_num_tokens=5000).length == 0.0
    with pytest.raises(ValueError, match="response_num_tokens"):
        score("MedIQ", WELL.format("A"), "A", num_tokens=100)


def test_l1_length_formulas() -> None:
    l1 = RewardConfig(length_formula="l1")
    # LCPO-Exact: -0.0003 * |1000 - 1300| = -0.09.
    exact = score("MedIQ", WELL.format("A"), "A", num_tokens=1000, response_num_tokens=1300, config=l1)
    assert exact.length == pytest.approx(-0.09)
    # LCPO-Max, correct: clip(0.0003 * (500 - 300) + 0.5, 0, 1) = 0.56 replaces the +1.
    correct = score("MedIQ", WELL.format("A"), "A", num_tokens=-500, response_num_tokens=300, config=l1)
    assert correct.correctness + correct.length == pytest.approx(0.56)
    # LCPO-Max, wrong: no length term.
    wrong = score("MedIQ", WELL.format("B"), "A", num_tokens=-500, response_num_tokens=300, config=l1)
    assert wrong.length == 0.0


# --- open-ended ---------------------------------------------------------------------------

REFERENCE = "aspirin and heparin"


def test_open_ended_merge_discrete() -> None:
    # "aspirin heparin": EMS = 100 * 2/2 = 100; BLEU: p1 = 2/2 with bp = exp(1 - 3/2) -> 0.6065,
    # p2 = 0.1/1, p3 = 0.1/1 -> 0.0607 each; mean 0.2426. Merge = 50.12 > 45 -> +1.
    result = score("medical-o1-reasoning-SFT", WELL.format("aspirin heparin"), REFERENCE)
    assert (result.correctness, result.valid) == (1.0, 1)
    # "aspirin aspirin heparin warfarin": EMS = 100 * 2/4 = 50 -> Merge < 45 -> -1.
    result = score("medical-o1-reasoning-SFT", WELL.format("aspirin aspirin heparin warfarin"), REFERENCE)
    assert (result.correctness, result.valid) == (-1.0, 0)


def test_open_ended_continuous_and_other_metrics() -> None:
    answer = WELL.format("aspirin aspirin heparin")  # EMS = 100 * 2/3
    ems = score("medical-o1-reasoning-SFT", answer, REFERENCE, config=RewardConfig(reward_type="continuous", reward_metric="ems"))
    assert ems.correctness == pytest.approx(2 / 3)
    # ROUGE-L: LCS(aspirin aspirin heparin, aspirin and heparin) = 2, P = 2/3, R = 2/3 -> 66.67.
    rouge = score("medical-o1-reasoning-SFT", answer, REFERENCE, config=RewardConfig(reward_type="continuous", reward_metric="rouge_l"))
    assert rouge.correctness == pytest.approx(2 / 3)
    # BLEU on its 0-1 scale never passes 45 ...
    exact = WELL.format(REFERENCE)
    assert score("medical-o1-reasoning-SFT", exact, REFERENCE, config=RewardConfig(reward_metric="bleu")).correctness == -1.0
    # ... unless put on the 0-100 scale.
    percent = RewardConfig(reward_metric="bleu", bleu_percent=True)
    assert score("medical-o1-reasoning-SFT", exact, REFERENCE, config=percent).correctness == 1.0


def test_answer_fallbacks() -> None:
    boxed = "<think>x</think> so \\boxed{C}"
    assert score("MedIQ", boxed, "C").answer is None
    assert score("MedIQ", boxed, "C", config=RewardConfig(answer_fallback="boxed")).answer == "C"
    assert score("MedIQ", "  C \n", "C", config=RewardConfig(answer_fallback="response")).answer == "C"
    nested = "\\boxed{\\frac{1}{2}}"
    assert score("MedCalc-Bench", nested, "x", config=RewardConfig(answer_fallback="boxed")).answer == "\\frac{1}{2}"


# --- errors -------------------------------------------------------------------------------


def test_unknown_data_source_names_it_and_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown data_source 'PubMedQA'.*MedCalc-Bench.*MedIQ"):
        score("PubMedQA", WELL.format("A"), "A")


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [("reward_type", "binary", "continuous"), ("reward_metric", "BLEU", "rouge_l"), ("choice_parsing", "loose", "lenient")],
)
def test_config_rejects_bad_values(field: str, value: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=rf"reward\.{field}='{value}'.*{allowed}"):
        RewardConfig(**{field: value})
    with pytest.raises(ValueError, match="reward.scale"):
        RewardConfig(scale=0)
