"""Length budgets: the prompt's length instruction is rewritten exactly as prepare-data writes it."""

from __future__ import annotations

import pytest

from megatron_rl.data.prepare import SYSTEM_PROMPT, Problem
from megatron_rl.data.schema import read_rows
from megatron_rl.evaluation.budgets import budget_num_tokens, with_budget


def test_rewritten_row_equals_the_row_prepare_data_writes() -> None:
    problem = Problem("MedIQ", "Which drug?", "B", options=(("A", "x"), ("B", "y")))
    row = problem.to_row(300, "test", 0, SYSTEM_PROMPT)
    for num_tokens in (512, -512, -1):
        assert with_budget(row, num_tokens) == problem.to_row(num_tokens, "test", 0, SYSTEM_PROMPT)
    unbudgeted = problem.to_row(-1, "test", 0, SYSTEM_PROMPT)
    assert with_budget(unbudgeted, 1024) == problem.to_row(1024, "test", 0, SYSTEM_PROMPT)


def test_medu1_templated_prompt(medu1_dir) -> None:
    row = read_rows(medu1_dir / "mediq.parquet")[0][0]
    assert row.num_tokens == 1820 and row.is_templated
    content = row.messages[0][1]
    budgeted = with_budget(row, budget_num_tokens(512, "max"))
    assert budgeted.num_tokens == -512
    assert budgeted.messages[0][1] == content.replace("tags. Think for 1820 tokens.<|im_end|>",
                                                      "tags. Think for maximum 512 tokens.<|im_end|>")
    assert with_budget(with_budget(row, -1), 1820) == row  # no instruction and back: byte for byte


def test_a_prompt_without_the_instruction_is_named() -> None:
    row = Problem("MedIQ", "Which drug?", "B", options=(("A", "x"),)).to_row(300, "test", 7, "")
    edited = row.__class__(**{**row.__dict__, "messages": (("user", "Which drug? Answer briefly."),)})
    with pytest.raises(ValueError, match=r"mediq.parquet: row 7: cannot set a length budget: .*'Think for 300 tokens.'"):
        with_budget(edited, 512, where="mediq.parquet: row 7")


@pytest.mark.parametrize(("budget", "mode", "message"), [(0, "exact", "budget=0"), (512, "min", "length_mode='min'")])
def test_bad_budget_or_mode(budget, mode, message) -> None:
    with pytest.raises(ValueError, match=message):
        budget_num_tokens(budget, mode)
