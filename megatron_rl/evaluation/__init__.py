"""Evaluation of Hugging Face models on the medical benchmarks (``megatron-rl eval``, docs/eval.md).

    from megatron_rl.evaluation import EvalConfig, run_eval
    summary = run_eval(EvalConfig(model="out/hf", data=("mediq.parquet",), output_dir="eval/", n=4))
"""

from megatron_rl.evaluation.metrics import pass_at_k, summarize
from megatron_rl.evaluation.runner import EvalConfig, run_eval

__all__ = ["EvalConfig", "pass_at_k", "run_eval", "summarize"]
