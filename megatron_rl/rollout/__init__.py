"""Rollout engines: sample responses from the current policy and take its new weights in place.

``base`` holds the interface and records; ``vllm_engine`` (training) and ``hf_engine`` (a
transformers fallback) implement it. Neither engine module is imported here, so importing the
package needs neither vLLM nor a model.
"""

from megatron_rl.rollout.base import Rollout, RolloutEngine, SamplingConfig

__all__ = ["Rollout", "RolloutEngine", "SamplingConfig"]
