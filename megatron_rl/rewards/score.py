"""Scoring one response: format + correctness + length, dispatched by ``data_source``.

The default ``RewardConfig`` reproduces the Med-U1 training reward (arXiv 2506.12307):

- answer: the last ``<answer>...</answer>``, stripped; empty counts as missing;
- format: +1 if <think></think><answer></answer> appear once each, in order, else -1
  (with ``check_think=False``: +1 if an answer was extracted, else -1);
- correctness, by task: multiple choice +1 if the answer is the letter, else -1 (0 when the
  ground truth is no letter A-N); MedCalc +1 if the number lies in [lower, upper] (dates and
  week/day tuples: exact string match), else -1; open-ended +1 if the metric > threshold
  (discrete) or metric / scale (continuous);
- length (only with an answer and a length-controlled row): exact 1 - |n - N| / 1500,
  max (N - n) / 500, both clipped to [-1, 1];
- total = format + correctness + length, where a missing answer gives correctness -2 and
  length 0 (Med-U1's flat -2);
- valid: the 0/1 validation score (no format check; open-ended uses Merge > threshold).

``score`` never raises on model output: None, bytes, garbage and huge texts get a score in
bounded time. It raises ValueError for caller mistakes: an unknown data_source, or a
length-controlled row scored without the response's token count.
"""

from __future__ import annotations

from typing import NamedTuple

from megatron_rl.rewards import extract, text
from megatron_rl.rewards.config import DEFAULT_CONFIG, RewardConfig

CHOICE = "multiple_choice"
NUMERIC = "numeric"
OPEN_ENDED = "open_ended"

TASK_OF_SOURCE = {
    "MedIQ": CHOICE,
    "MedXpertQA": CHOICE,
    "EHRNoteQA": CHOICE,
    "MMLU-Pro": CHOICE,
    "MedCalc-Bench": NUMERIC,
    "medical-o1-reasoning-SFT": OPEN_ENDED,
}
"""The task type of every data_source the reward knows."""

MISSING_ANSWER_PENALTY = -2.0
NO_LENGTH_CONTROL = -1

_EXACT_LENGTH_WIDTH = 1500  # exact mode: the reward falls to 0 at |n - N| = 1500 tokens
_MAX_LENGTH_SLOPE = 1 / 500  # max mode: the reward changes by 1 per 500 tokens


class RewardResult(NamedTuple):
    """One response's reward and its parts; ``total == format + correctness + length``."""

    total: float
    format: float
    correctness: float
    length: float
    answer: str | None
    """The extracted answer, or None when there is none."""
    valid: int
    """The validation score: 1 if the answer is correct, else 0."""


def task_of(data_source: str) -> str:
    """The task type of ``data_source``; ValueError naming it and the known sources if unknown."""
    task = TASK_OF_SOURCE.get(data_source) if isinstance(data_source, str) else None
    if task is None:
        known = ", ".join(sorted(TASK_OF_SOURCE))
        raise ValueError(f"unknown data_source {data_source!r}; known sources: {known}")
    return task


def score(
    data_source: str,
    response: object,
    ground_truth: object,
    *,
    lower_limit: object = None,
    upper_limit: object = None,
    num_tokens: int | None = NO_LENGTH_CONTROL,
    response_num_tokens: int | None = None,
    config: RewardConfig = DEFAULT_CONFIG,
) -> RewardResult:
    """Score one response (the response text only, never the prompt).

    Args:
        data_source: which benchmark the row comes from; picks the task type.
        response: the model's response text.
        ground_truth: the reference answer (a letter, a number/date/tuple, or free text).
        lower_limit, upper_limit: MedCalc's inclusive bounds for a numeric answer.
        num_tokens: the row's length instruction: N > 0 "think for N tokens" (exact), -N
            "at most N" (max), -1 none.
        response_num_tokens: tokens in the response; required when num_tokens != -1.
        config: the reward knobs (default: the Med-U1 preset).
    """
    task = TASK_OF_SOURCE.get(data_source) if type(data_source) is str else None
    if task is None:
        task_of(data_source)  # raises, naming the known sources
    if type(num_tokens) is not int:
        num_tokens = NO_LENGTH_CONTROL if num_tokens is None else int(num_tokens)
    if num_tokens != NO_LENGTH_CONTROL and response_num_tokens is None:
        raise ValueError(
            f"response_num_tokens is required to score a length-controlled row (num_tokens={num_tokens})"
        )
    if type(response) is not str:
        response = extract.as_text(response)
    truth = ground_truth if type(ground_truth) is str else "" if ground_truth is None else str(ground_truth)
    answer = _answer(response, config)
    if task == CHOICE and answer is not None and config.choice_parsing == "lenient":
        answer = extract.lenient_choice(answer)

    if config.check_think:
        format_score = 1.0 if extract.has_think_answer_format(response) else -1.0
    else:
        format_score = 1.0 if answer is not None else -1.0

    if answer is None:
        correctness, valid, length = MISSING_ANSWER_PENALTY, 0, 0.0
    else:
        if task == CHOICE:
            correctness, valid = _choice(answer, truth)
        elif task == NUMERIC:
            correctness, valid = _numeric(answer, truth, lower_limit, upper_limit)
        else:
            correctness, valid = _open_ended(answer, truth, config)
        length = 0.0 if num_tokens == NO_LENGTH_CONTROL else _length(num_tokens, response_num_tokens, correctness, config)
    return RewardResult(format_score + correctness + length, format_score, correctness, length, answer, valid)


def _answer(response: str, config: RewardConfig) -> str | None:
    answer = extract.tagged_answer(response)
    if answer is None and config.answer_fallback == "boxed":
        answer = extract.boxed_answer(response)
    elif answer is None and config.answer_fallback == "response":
        answer = response.strip() or None
    return answer


def _choice(answer: str, truth: str) -> tuple[float, int]:
    valid = int(answer == truth)
    if truth not in extract.OPTION_LETTERS:
        return 0.0, valid  # not a multiple-choice ground truth: no correctness signal
    return (1.0 if valid else -1.0), valid


def parse_number(value: object) -> float | None:
    """``float(value)`` as Python parses it ('1e3', '+5', '25.' yes; '5%', '1,000', '3 mg' no)."""
    if type(value) is not str and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def _numeric(answer: str, truth: str, lower_limit: object, upper_limit: object) -> tuple[float, int]:
    truth_value = parse_number(truth)
    if truth_value is None:  # a date (MM/DD/YYYY) or a (weeks, days) tuple: exact match
        correct = answer == truth
    else:
        value = parse_number(answer)
        # A missing or unreadable bound falls back to the ground truth itself.
        lower = parse_number(lower_limit)
        upper = parse_number(upper_limit)
        lower = truth_value if lower is None else lower
        upper = truth_value if upper is None else upper
        correct = value is not None and lower <= value <= upper
    return (1.0 if correct else -1.0), int(correct)


def _open_ended(answer: str, truth: str, config: RewardConfig) -> tuple[float, int]:
    ref = text._reference(truth)
    tokens = text.normalize(answer)
    ems = text._ems(tokens, ref)
    bleu = text.bleu(truth, answer) * (100 if config.bleu_percent else 1)
    merge = 0.5 * ems + 0.5 * bleu
    if config.reward_metric == "merge":
        metric = merge
    elif config.reward_metric == "ems":
        metric = ems
    elif config.reward_metric == "bleu":
        metric = bleu
    else:
        metric = text._rouge_l(tokens, ref)
    if config.reward_type == "discrete":
        correctness = 1.0 if metric > config.threshold else -1.0
    else:
        correctness = float(metric) / float(config.scale)
    return correctness, int(merge > config.threshold)


def _length(num_tokens: int, response_num_tokens: int, correctness: float, config: RewardConfig) -> float:
    used = float(response_num_tokens)
    if config.length_formula == "l1":
        if num_tokens >= 0:  # LCPO-Exact: -alpha |N - n|
            return -config.l1_alpha * abs(num_tokens - used)
        # LCPO-Max: a correct answer earns clip(alpha (N - n) + delta, 0, 1) instead of its full value.
        budget = min(1.0, max(0.0, config.l1_alpha * (abs(num_tokens) - used) + config.l1_delta))
        return correctness * (budget - 1.0) if correctness > 0 else 0.0
    if num_tokens >= 0:
        return max(-1.0, min(1.0, 1 - abs(used - num_tokens) / _EXACT_LENGTH_WIDTH))
    over = used - abs(num_tokens)
    return max(-1.0, min(1.0, _MAX_LENGTH_SLOPE * over * -1))

