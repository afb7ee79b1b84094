"""Reward knobs: the Med-U1 preset by default, documented opt-in alternatives beside it."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.validation import check_choice, check_range

REWARD_TYPES = ("discrete", "continuous")
REWARD_METRICS = ("merge", "ems", "bleu", "rouge_l")
CHOICE_PARSINGS = ("exact", "lenient")
ANSWER_FALLBACKS = ("none", "boxed", "response")
LENGTH_FORMULAS = ("medu1", "l1")


@dataclass(frozen=True)
class RewardConfig:
    """How responses are scored. The defaults reproduce the Med-U1 training reward exactly.

    Every field below the first five is an opt-in departure from the Med-U1 code, for the
    places where that code behaves oddly; see docs/rewards.md for the numbers behind each.
    """

    reward_type: str = "discrete"
    """Open-ended correctness: 'discrete' (+1 if metric > threshold else -1) or 'continuous'
    (metric / scale)."""

    reward_metric: str = "merge"
    """Open-ended metric: 'merge' (0.5 EMS + 0.5 BLEU), 'ems', 'bleu' or 'rouge_l'."""

    threshold: float = 45.0
    """Discrete open-ended threshold, compared with the metric (EMS and ROUGE-L are 0-100,
    BLEU is 0-1 unless bleu_percent)."""

    scale: float = 100.0
    """Continuous open-ended divisor: correctness = metric / scale."""

    check_think: bool = True
    """Format +1 needs <think></think><answer></answer> each exactly once and in order; when
    False, format is +1 whenever an answer was extracted."""

    bleu_percent: bool = False
    """Put BLEU on the 0-100 scale of EMS and ROUGE-L. Med-U1 mixes scales (BLEU 0-1), so its
    Merge can never exceed 50 + 0.5 and plain BLEU never passes threshold 45."""

    choice_parsing: str = "exact"
    """Multiple choice: 'exact' (the answer must be the bare letter, as Med-U1 scores it) or
    'lenient' (also read '(C)', 'C.', 'C: text', 'Option C', '**C**')."""

    answer_fallback: str = "none"
    """Where no <answer>...</answer> is found: 'none' (no answer, as in training), 'boxed'
    (the last \\boxed{...}) or 'response' (the whole response, as Med-U1's evaluation does)."""

    length_formula: str = "medu1"
    """'medu1': exact 1 - |n - N| / 1500, max (N - n) / 500, clipped to [-1, 1].
    'l1': the L1 paper's LCPO: exact -alpha |n - N|; max rewards a correct answer
    clip(alpha (N - n) + delta, 0, 1) instead of 1."""

    l1_alpha: float = 0.0003
    """LCPO alpha (length_formula='l1')."""

    l1_delta: float = 0.5
    """LCPO-Max delta (length_formula='l1')."""

    def __post_init__(self) -> None:
        check_choice("reward.reward_type", self.reward_type, REWARD_TYPES)
        check_choice("reward.reward_metric", self.reward_metric, REWARD_METRICS)
        check_choice("reward.choice_parsing", self.choice_parsing, CHOICE_PARSINGS)
        check_choice("reward.answer_fallback", self.answer_fallback, ANSWER_FALLBACKS)
        check_choice("reward.length_formula", self.length_formula, LENGTH_FORMULAS)
        check_range("reward.scale", self.scale, low=0.0, low_inclusive=False)
        check_range("reward.l1_alpha", self.l1_alpha, low=0.0)
        check_range("reward.l1_delta", self.l1_delta, low=0.0, high=1.0)
        check_range("reward.threshold", self.threshold)


DEFAULT_CONFIG = RewardConfig()
"""The Med-U1 preset (RewardConfig is frozen, so one shared instance serves as every default)."""
