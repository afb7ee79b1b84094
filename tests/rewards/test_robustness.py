"""Bad model output never crashes scoring, and no input makes it slow."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_rl.rewards import TASK_OF_SOURCE, RewardConfig, RewardResult, score, score_batch

TRUTH = {"MedIQ": "C", "MedXpertQA": "J", "EHRNoteQA": "A", "MMLU-Pro": "F", "MedCalc-Bench": "25.2",
         "medical-o1-reasoning-SFT": "Gradenigo syndrome: otorrhoea, facial pain and diplopia."}
CONFIGS = [RewardConfig(), RewardConfig(reward_type="continuous", reward_metric="rouge_l", check_think=False,
                                        choice_parsing="lenient", answer_fallback="boxed", length_formula="l1",
                                        bleu_percent=True)]
# A complexity check, not a speed measurement (bench/rewards.py measures speed): linear
# scoring takes milliseconds here, a quadratic regex or LCS takes minutes. CPU time of this
# thread, so that other jobs on a loaded machine cannot fail it.
BLOW_UP_SECONDS = 3.0


def well_defined(result: RewardResult) -> bool:
    parts = (result.total, result.format, result.correctness, result.length)
    return (
        all(isinstance(x, float) and math.isfinite(x) for x in parts)
        and result.total == pytest.approx(result.format + result.correctness + result.length)
        and result.format in (-1.0, 1.0)
        and result.valid in (0, 1)
        and (result.answer is None or isinstance(result.answer, str))
    )


def adversarial_responses() -> dict[str, object]:
    rng = random.Random(0)
    megabyte = rng.randbytes(1 << 20)
    return {
        "none": None,
        "int": 12345,
        "list": ["<answer>C</answer>"],
        "bytes": b"<think>x</think><answer>C</answer>",
        "invalid utf-8": megabyte,
        "1 MB random text": megabyte.decode("latin-1"),
        "unicode": "<think>發燒 🤒 \u202e\u0000</think><answer>Ｃ</answer>",
        "nested": "<think><think><answer><answer>C</answer></answer></think></think>",
        "10,000 answer tags": "<answer>C</answer>" * 10_000,
        "10,000 open tags": "<answer>" * 10_000 + "C",
        "open tags then one close": "<answer>" * 50_000 + "</answer>",
        "200 kB one answer": "<think>t</think><answer>" + "otorrhoea pain diplopia. " * 8_000 + "</answer>",
        "200 kB no spaces": "<answer>" + "x" * 200_000 + "</answer>",
        "boxed unbalanced": "\\boxed{" * 20_000,
        "many periods": "<answer>" + ". " * 100_000 + "</answer>",
        "many commas": "<answer>" + "1,2 (x) " * 25_000 + "</answer>",
        "option then spaces": "<answer>The correct option is" + " " * 100_000 + "x</answer>",
    }


@pytest.mark.parametrize("config", CONFIGS, ids=["preset", "every-option"])
@pytest.mark.parametrize("source", sorted(TASK_OF_SOURCE))
def test_adversarial_responses_get_a_well_defined_score_quickly(source: str, config: RewardConfig) -> None:
    for name, response in adversarial_responses().items():
        start = time.thread_time()
        result = score(source, response, TRUTH[source], lower_limit="24", upper_limit="26",
                       num_tokens=-300, response_num_tokens=10_000, config=config)
        elapsed = time.thread_time() - start
        assert well_defined(result), (source, name, result)
        assert elapsed < BLOW_UP_SECONDS, (source, name, elapsed)


def test_non_text_responses_are_scored_as_empty() -> None:
    for response in (None, 12345, ["<answer>C</answer>"]):
        result = score("MedIQ", response, "C")
        assert (result.total, result.answer, result.valid) == (-3.0, None, 0)
    assert score("MedIQ", b"<think>x</think><answer>C</answer>", "C").total == 2.0


_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
_TAGGED = st.lists(st.one_of(_TEXT, st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}"])),
                   max_size=40).map("".join)


@settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.sampled_from(sorted(TASK_OF_SOURCE)), response=_TAGGED, truth=_TEXT,
       num_tokens=st.integers(-5000, 5000), used=st.integers(0, 100_000), config=st.sampled_from(CONFIGS),
       lower=st.one_of(st.none(), _TEXT, st.floats(allow_nan=True)), upper=st.one_of(st.none(), _TEXT))
def test_any_input_gets_a_well_defined_score(source, response, truth, num_tokens, used, config, lower, upper) -> None:
    result = score(source, response, truth, lower_limit=lower, upper_limit=upper, num_tokens=num_tokens,
                   response_num_tokens=used, config=config)
    assert well_defined(result)


def test_score_batch_checks_every_row_before_scoring() -> None:
    good = {"data_source": "MedIQ", "response": "<answer>C</answer>", "ground_truth": "C"}
    with pytest.raises(ValueError, match=r"row 1: unknown data_source 'PubMedQA'"):
        score_batch([good, {**good, "data_source": "PubMedQA"}])
    with pytest.raises(ValueError, match=r"row 0: missing field 'ground_truth'"):
        score_batch([{"data_source": "MedIQ", "response": "x"}])
    with pytest.raises(ValueError, match=r"row 0: response_num_tokens is required"):
        score_batch([{**good, "num_tokens": 300}])
    with pytest.raises(ValueError, match="num_workers"):
        score_batch([good], num_workers=0)
    assert score_batch([good, {**good, "response": None}])[1].total == -3.0
