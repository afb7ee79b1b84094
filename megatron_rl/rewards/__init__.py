"""Medical reward modules: score a model's response against a benchmark's ground truth.

    from megatron_rl.rewards import score
    result = score("MedIQ", "<think>...</think><answer>C</answer>", "C")
    result.total, result.format, result.correctness, result.length, result.answer, result.valid

Pure Python: no torch, no config objects beyond ``RewardConfig``, never evaluates model text.
"""

from megatron_rl.rewards.batch import score_batch
from megatron_rl.rewards.config import RewardConfig
from megatron_rl.rewards.score import TASK_OF_SOURCE, RewardResult, score, task_of

__all__ = ["TASK_OF_SOURCE", "RewardConfig", "RewardResult", "score", "score_batch", "task_of"]
