"""Length budgets for evaluation: rewrite a row's length instruction, as ``prepare-data`` writes it.

A prepared prompt (ours or Med-U1's) ends its user turn with the task's answer instruction, one
space and the length instruction ("Think for N tokens.", "Think for maximum N tokens." or nothing).
Evaluating a model at budget B replaces that instruction with the one for B, so the rest of the
prompt stays byte for byte as it was, chat template included.
"""

from __future__ import annotations

from dataclasses import replace

from megatron_rl.data.prepare import TASK_INSTRUCTIONS, length_instruction
from megatron_rl.data.schema import NO_LENGTH_CONTROL, PromptRow
from megatron_rl.rewards.score import task_of
from megatron_rl.validation import check_choice

LENGTH_MODES = ("exact", "max")


def budget_num_tokens(budget: int | None, length_mode: str) -> int:
    """``reward_model.num_tokens`` for a budget: B (exact), -B (max), -1 without a budget (None)."""
    check_choice("eval.length_mode", length_mode, LENGTH_MODES)
    if budget is None:
        return NO_LENGTH_CONTROL
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive integer (or None for no length instruction)")
    return budget if length_mode == "exact" else -budget


def with_budget(row: PromptRow, num_tokens: int, *, where: str = "row") -> PromptRow:
    """``row`` with its length instruction replaced by that of ``num_tokens`` (see
    :func:`megatron_rl.data.prepare.length_instruction`) and ``reward_model.num_tokens`` set to it.

    The instruction is looked for right after the task's answer instruction in the last message
    holding it (the user turn, or the one pre-templated message of Med-U1 files).

    Raises:
        ValueError: no message holds the answer instruction followed by the row's current length
            instruction (a prompt not written by ``prepare-data`` or Med-U1); ``where`` names the row.
    """
    anchor = TASK_INSTRUCTIONS[task_of(row.data_source)] + " "
    old = anchor + length_instruction(row.num_tokens)
    new = anchor + length_instruction(num_tokens)
    messages = list(row.messages)
    for i in range(len(messages) - 1, -1, -1):
        role, content = messages[i]
        at = content.rfind(old)
        # With no instruction (num_tokens -1) the anchor must end the user text, not precede other text.
        if at >= 0 and (row.num_tokens != NO_LENGTH_CONTROL or _ends_turn(content, at + len(old))):
            messages[i] = (role, content[:at] + new + content[at + len(old):])
            return replace(row, messages=tuple(messages), num_tokens=num_tokens)
    raise ValueError(
        f"{where}: cannot set a length budget: no message holds the answer instruction followed by "
        f"{length_instruction(row.num_tokens)!r} (num_tokens={row.num_tokens}); expected a prompt written by "
        "prepare-data or the Med-U1 files"
    )


def _ends_turn(content: str, end: int) -> bool:
    """Whether the user text ends at ``end`` (end of message, or a chat template's end-of-turn marker)."""
    rest = content[end:]
    return rest == "" or rest.startswith(("<|im_end|>", "<|eot_id|>"))
