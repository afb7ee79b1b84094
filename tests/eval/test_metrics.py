"""pass@k by hand, and the summary's arithmetic on a few hand-made records."""

from __future__ import annotations

import pytest

from megatron_rl.evaluation.metrics import format_markdown, pass_at_k, pass_ks, summarize


def test_pass_at_k_by_hand() -> None:
    # n = 5 samples, c = 2 correct: pass@k = 1 - C(n - c, k) / C(n, k) = 1 - C(3, k) / C(5, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(1 - 3 / 5)  # C(3,1) = 3, C(5,1) = 5 -> 0.4 = c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2) = 3, C(5,2) = 10 -> 0.7
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # C(3,3) = 1, C(5,3) = 10 -> 0.9
    assert pass_at_k(5, 2, 4) == 1.0  # only 3 wrong samples: any 4 include a correct one
    # n = 4, c = 1: pass@2 = 1 - C(3,2) / C(4,2) = 1 - 3/6 = 0.5; pass@4 = 1
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0


@pytest.mark.parametrize(("n", "c", "k", "message"), [(4, 5, 1, "num_correct=5"), (4, 2, 5, "k=5"),
                                                      (4, 2, 0, "k=0")])
def test_pass_at_k_rejects_impossible_counts(n, c, k, message) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_pass_ks() -> None:
    assert pass_ks(1) == [1] and pass_ks(2) == [1, 2] and pass_ks(5) == [1, 2, 4, 5] and pass_ks(8) == [1, 2, 4, 8]


def _record(prompt: str, sample: int, score: int, length: int, budget=None, source="MedIQ", **extra) -> dict:
    return {"id": prompt, "data_source": source, "budget": budget, "sample_index": sample, "score": score,
            "response_num_tokens": length, "finish_reason": "length" if length >= 100 else "stop", **extra}


def test_summary_by_hand() -> None:
    records = [
        _record("a", 0, 1, 40, 50), _record("a", 1, 0, 60, 50),  # prompt a: 1 of 2 correct
        _record("b", 0, 0, 100, 50), _record("b", 1, 0, 20, 50),  # prompt b: 0 of 2
        _record("h", 0, 1, 10, None, "medical-o1-reasoning-SFT", ems=50.0, rouge_l=20.0),
        _record("h", 1, 0, 30, None, "medical-o1-reasoning-SFT", ems=10.0, rouge_l=40.0),
    ]
    rows = {(r["data_source"], r["budget"]): r for r in summarize(records, n=2)}
    mediq = rows[("MedIQ", 50)]
    assert mediq["prompts"] == 2 and mediq["samples"] == 4
    assert mediq["accuracy"] == 0.25 and mediq["pass@1"] == 0.25
    assert mediq["pass@2"] == 0.5  # prompt a: 1 - C(1,2)/C(2,2) = 1; prompt b: 0 -> mean 0.5
    assert mediq["mean_length"] == 55  # (40 + 60 + 100 + 20) / 4
    assert mediq["mean_abs_budget_error"] == 25  # (10 + 10 + 50 + 30) / 4
    assert mediq["truncated"] == 0.25 and mediq["ems"] is None
    huatuo = rows[("medical-o1-reasoning-SFT", None)]
    assert (huatuo["ems"], huatuo["rouge_l"], huatuo["mean_abs_budget_error"]) == (30.0, 30.0, None)


def test_summary_refuses_a_prompt_with_missing_samples() -> None:
    with pytest.raises(ValueError, match=r"prompt 'a' \(budget None\) has 1 samples, expected n=2"):
        summarize([_record("a", 0, 1, 10)], n=2)


def test_format_valid_rate_looping_share_and_prompts_own_budgets_by_hand() -> None:
    # No --budgets: each prompt keeps its own "Think for N tokens." (num_tokens N) or none (-1).
    records = [
        _record("a", 0, 1, 40, num_tokens=100, format_valid=True, loop_period=None),
        _record("a", 1, 0, 300, num_tokens=100, format_valid=False, loop_period=3),  # looping to max_tokens
        _record("b", 0, 0, 50, num_tokens=400, format_valid=True, loop_period=None),
        _record("b", 1, 0, 10, num_tokens=400, format_valid=True, loop_period=None),
    ]
    (row,) = summarize(records, n=2)
    assert row["budget"] is None and row["budget_label"] == "own 100-400"
    assert row["mean_abs_budget_error"] == (60 + 200 + 350 + 390) / 4  # each length vs its own N
    assert row["format_valid"] == 3 / 4
    assert row["looping"] == 1 and row["looping_token_share"] == 300 / (40 + 300 + 50 + 10)
    table = format_markdown([row], 2)
    assert "| MedIQ | own 100-400 | 2 | 4 | 0.250 | 0.750 | - | - | 100.0 | 250.0 | 0.250 | 1 (75%) |" in table

    # "Think for maximum N tokens." (num_tokens -N) and rows without an instruction
    mixed = [_record("c", 0, 0, 30, num_tokens=-512), _record("d", 0, 0, 30, num_tokens=-1)]
    (row,) = summarize(mixed, n=1)
    assert row["budget_label"] == "own max 512 (1 of 2 none)" and row["mean_abs_budget_error"] == 482
    assert row["format_valid"] is None and row["looping"] is None  # records written before these fields
    (row,) = summarize([_record("e", 0, 0, 30, num_tokens=-1)], n=1)
    assert (row["budget_label"], row["mean_abs_budget_error"]) == ("none", None)
    (row,) = summarize([_record("e", 0, 0, 30, budget=64, num_tokens=64)], n=1)
    assert (row["budget_label"], row["mean_abs_budget_error"]) == ("64", 34)
