"""The memory plan of a run: bytes per rank and per phase, from the run's config and the model's
config.json alone (no weights are read, nothing is allocated).

    plan = plan_run(cfg, hf_config, num_gpus=8, device="gpu", device_bytes=80 << 30)
    print(plan.table())              # items x phases of the largest rank, the peak phase and a verdict
    plan.fits, plan.peak_bytes       # the verdict and the bytes it rests on
    check_run_fits(cfg, hf_config, world_size=8, local_world_size=8)   # at train start: the real device

Phases of one step, in the trainer's order (``megatron_rl/trainer/colocation.py``): ``generate`` (the
engine awake), ``logprob`` (old and reference logprobs, no gradients; the engine asleep), ``critic``
(PPO with a critic only, ``algorithm.advantage=gae``: the critic's forward, backward and optimizer
step), ``update`` (forward and backward of the policy, one micro-batch at a time), ``step`` (the
optimizer step) and ``sync`` (the engine's weights awake, the trainer's weights pushed in buckets).

Items (bytes on one rank's device; on CPU the host's RAM, shared by its ranks):

``params``       the policy stage's parameters (bf16 on GPU with ``optim.bf16``, fp32 on CPU), with
                 Megatron's padding of the vocabulary and, under the distributed optimizer, of its
                 contiguous parameter buffer.
``grads``        Megatron DDP's gradient buffer: fp32 (``grad_reduce_in_fp32``) for every parameter,
                 never sharded (ZeRO-1 shards the optimizer only); released outside the update when
                 the optimizer is offloaded.
``optimizer``    Adam's two fp32 moments, plus fp32 master weights with bf16 parameters; divided over
                 the data-parallel ranks with ``optim.use_distributed_optimizer``; on the host outside
                 the update when offloaded (GPU).
``reference``    the frozen reference (kl_coef > 0 or kl_in_reward), like the policy's parameters; on the device only
                 in the logprob phase when offloaded.
``engine``       the colocated vLLM engine, on the ranks that generate (tp_rank 0 and pp_rank 0 of each
                 replica) only. GPU: ``rollout.gpu_memory_utilization`` x the device (weights, KV cache,
                 its activations and CUDA graphs) while awake; :data:`ENGINE_ASLEEP_BYTES` asleep
                 (``rollout.enable_sleep_mode``: sleep level 1 moves the weights to the host and drops
                 the KV cache); its weights plus that in the sync phase. CPU: fp32 weights +
                 ``rollout.kv_cache_gib`` + :data:`CPU_ENGINE_OVERHEAD_BYTES`, always (no sleep on CPU).
``activations``  what autograd keeps for the backward of one micro-batch (times the micro-batches in
                 flight at PP > 1), for the chosen recompute and layer spec; in the logprob phase the
                 largest live tensors of one no-grad forward. Formulas: :func:`layer_activation_bytes`.
``logits``       the larger of two moments of the update: the output layer and softmax of one chunk of
                 response tokens (``logprob_chunk_size``) in forward and backward with the output
                 weight's gradient, or one decoder layer's backward (its recomputed activations under
                 full recompute, the attention gradients of the local spec).
``optimizer_step`` the optimizer step's temporaries: torch's multi-tensor AdamW (Megatron's Adam without
                 Transformer Engine) makes one fp32 copy of its state shard on GPU (measured); on CPU
                 the per-tensor AdamW, one copy of the largest tensor.
``sync_buffers`` the weight sync's reused buffers (one bucket of HF tensors, and the gathered TP shards)
                 on the rank that feeds the engine; plus, in the sync phase, one fused group re-made by
                 the engine's reload.
``critic``       PPO with a critic: the value model's parameters (the policy's trunk with an untied
                 embedding and a ``hidden + 1`` value head instead of the output layer), its fp32
                 gradient buffer and Adam state by ``critic.optim`` (bf16, distributed optimizer), on the
                 device in every phase, but for its gradients and Adam state outside the ``critic``
                 phase when the optimizer is offloaded (GPU). In the ``critic`` phase its update's
                 activations (its micro-batch: ``critic.micro_batch_size`` or its token budget; no
                 vocabulary-wide output layer) and its optimizer step's temporaries are the
                 ``activations``, ``logits`` (the backward's transient) and ``optimizer_step`` items,
                 counted together (an over-estimate by the smaller of the two moments).
``runtime``      GPU: CUDA context, cuBLAS/NCCL workspaces (:data:`CUDA_RUNTIME_BYTES`) and the caching
                 allocator's slack (:data:`ALLOCATOR_SLACK`); CPU: the process itself
                 (:data:`CPU_PROCESS_BASELINE_BYTES`) and the allocator's slack (:data:`CPU_ALLOCATOR_SLACK`).

docs/memory.md derives the formulas and says how they were checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_rl.megatron.model import GPTShape, padded_vocab_size

if TYPE_CHECKING:  # megatron_rl.config imports this package's config module
    from megatron_rl.config import Config

__all__ = [
    "ALLOCATOR_SLACK",
    "ALLOCATOR_SLACK_MIN_BYTES",
    "CPU_ALLOCATOR_SLACK",
    "CPU_ENGINE_OVERHEAD_BYTES",
    "CPU_PROCESS_BASELINE_BYTES",
    "CUDA_RUNTIME_BYTES",
    "DEVICES",
    "ENGINE_ASLEEP_BYTES",
    "ITEMS",
    "PHASES",
    "InsufficientMemoryError",
    "MemoryPlan",
    "check_run_fits",
    "hf_config_for",
    "layer_activation_bytes",
    "plan_run",
]

GIB = 1 << 30
MIB = 1 << 20

PHASES = ("generate", "logprob", "update", "step", "sync")
"""The phases of one step, in the trainer's order ("update": forward and backward of the micro-batches;
"step": the optimizer step after them)."""

CRITIC_PHASES = ("generate", "logprob", "critic", "update", "step", "sync")
"""The phases of a step of PPO with a critic ("critic": the critic's update, before the policy's)."""

ITEMS = ("params", "grads", "optimizer", "reference", "critic", "engine", "activations", "logits",
         "optimizer_step", "sync_buffers", "runtime")
"""The items of a plan; they do not overlap, so a phase's total is their sum."""

DEVICES = ("gpu", "cpu")

CUDA_RUNTIME_BYTES = int(1.5 * GIB)
"""Per GPU process, outside PyTorch's allocator: the CUDA context with its kernels, cuBLAS workspaces
and NCCL communicators. Measured 1.22 GiB on an H100 (80 GB, driver 580, torch 2.11+cu130) after NCCL,
a bf16 GEMM and a Megatron model (``python bench/memory.py --gpu``, ``runtime_bytes``: total - free -
reserved); rounded up for the TP/DP communicators and vLLM's kernels in the same process."""

ALLOCATOR_SLACK = 0.15
"""Fraction of the trainer's device bytes that PyTorch's caching allocator reserves beyond what is
allocated (fragmentation, rounding to blocks), at least :data:`ALLOCATOR_SLACK_MIN_BYTES`; the engine's
memory is vLLM's own pool and excluded. Measured on an H100 for training steps of the 0.5B shape
(``python bench/memory.py --gpu``): reserved exceeded the peak allocated by 1.4-5.5% (no recompute),
7% (selective) and 11-17% (full recompute), and by 14% (9.0 GiB) for the 3B shape at 1024 + 4096 tokens
with full recompute, where the optimizer step's temporaries come after the backward's."""

ALLOCATOR_SLACK_MIN_BYTES = 2 * GIB
"""The least allocator slack planned for (see :data:`ALLOCATOR_SLACK`)."""

ENGINE_ASLEEP_BYTES = 1 * GIB
"""What a vLLM engine keeps on its GPU asleep (sleep level 1): CUDA graphs and buffers outside vLLM's
sleep-mode pool. An allowance (vLLM on CUDA could not be run here), not a measurement."""

CPU_PROCESS_BASELINE_BYTES = 520 * MIB
"""RSS of one trainer process on CPU before any model: Python, torch, megatron-core, megatron_rl and
vllm imported (measured here: 516 MiB; ``python bench/memory.py --baseline``)."""

CPU_ALLOCATOR_SLACK = 0.10
"""Fraction of a CPU process's planned bytes (beyond :data:`CPU_PROCESS_BASELINE_BYTES`) that its peak RSS
may exceed them by: glibc's allocator keeps freed pages mapped and transients such as the weights read
while a model loads overlap. Measured above the plan here: up to 4% for one training step of the 0.5B
shape (``python bench/memory.py``) and 3% for two GRPO steps of SmolLM2-135M on MedIQ rows
(tests/realmodel); rounded up."""

CPU_ENGINE_OVERHEAD_BYTES = 320 * MIB
"""RSS a vLLM CPU engine adds beyond its weights and KV cache: its runtime, tokenizer, scheduler and the
buffers of a generate call (measured here with the tiny model: 281 MiB peak; ``python bench/memory.py
--baseline``), rounded up."""

_INT64, _FP32, _BOOL = 8, 4, 1

# Saved per token of a micro-batch by the loss around the output layer (measured, see layer_activation_bytes):
# the input ids (int64), eleven fp32 (b, T-1) tensors of the policy loss, KL, entropy and aggregation,
# two bool masks; and per scored (response) token two int64 index pairs and two fp32 values (shift, entropy).
_LOSS_BYTES_PER_TOKEN = _INT64 + 11 * _FP32 + 2 * _BOOL
_LOSS_BYTES_PER_SCORED_TOKEN = 4 * _INT64 + 2 * _FP32


class InsufficientMemoryError(RuntimeError):
    """The run's memory plan does not fit the device; the message is :meth:`MemoryPlan.refusal`."""

    def __init__(self, plan: MemoryPlan) -> None:
        super().__init__(plan.refusal())
        self.plan = plan


# ---------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class _Dims:
    """One TP rank's share of the model (numbers from the HF config)."""

    shape: GPTShape
    tp: int
    pp: int

    @property
    def h(self) -> int:
        return self.shape.hidden_size

    @property
    def d(self) -> int:
        return self.shape.head_dim

    @property
    def heads(self) -> int:  # attention heads on this TP rank
        return self.shape.num_attention_heads // self.tp

    @property
    def groups(self) -> int:  # KV heads on this TP rank
        return self.shape.num_query_groups // self.tp

    @property
    def ffn(self) -> int:
        return self.shape.ffn_hidden_size // self.tp

    @property
    def vocab(self) -> int:  # rows of the (padded) embedding / output layer on this TP rank
        return padded_vocab_size(self.shape.vocab_size, 128, self.tp) // self.tp

    @property
    def layers(self) -> int:  # decoder layers per pipeline stage
        return self.shape.num_layers // self.pp

    def layer_param_numels(self) -> list[int]:
        """One decoder layer's parameters on this TP rank, in module order."""
        h, d = self.h, self.d
        qkv = (self.heads + 2 * self.groups) * d
        numels = [h, qkv * h]  # input norm, linear_qkv
        if self.shape.qkv_bias:
            numels.append(qkv)
        return [*numels, h * self.heads * d, h, 2 * self.ffn * h, h * self.ffn]  # proj, mlp norm, fc1, fc2

    def stage_param_numels(self, stage: int) -> list[tuple[int, bool]]:
        """``(numel, shared embedding)`` of each parameter of pipeline ``stage`` on one TP rank, in module
        order (what Megatron's GPTModel builds: embedding, layers, final norm, output layer)."""
        first, last = stage == 0, stage == self.pp - 1
        shared = self.shape.tied_embeddings and self.pp > 1
        params: list[tuple[int, bool]] = []
        if first:
            params.append((self.vocab * self.h, shared))
        params += [(n, False) for _ in range(self.layers) for n in self.layer_param_numels()]
        if last:
            params.append((self.h, False))
            if not self.shape.tied_embeddings or not first:
                params.append((self.vocab * self.h, shared))
        return params

    def hf_numel(self) -> int:
        """Parameters of the whole HF model (unpadded vocabulary; a tied head counted once)."""
        s = self.shape
        qkv = (s.num_attention_heads + 2 * s.num_query_groups) * s.head_dim
        layer = 2 * s.hidden_size + qkv * s.hidden_size + (qkv if s.qkv_bias else 0)
        layer += s.hidden_size * s.num_attention_heads * s.head_dim + 3 * s.ffn_hidden_size * s.hidden_size
        embed = s.vocab_size * s.hidden_size
        return s.num_layers * layer + s.hidden_size + embed * (1 if s.tied_embeddings else 2)

    def largest_hf_unit(self) -> int:
        """Elements of the largest tensor group the weight sync hands over whole (fused q/k/v, fused
        gate/up, the embedding or the head)."""
        s = self.shape
        qkv = (s.num_attention_heads + 2 * s.num_query_groups) * s.head_dim
        return max(s.vocab_size * s.hidden_size, qkv * (s.hidden_size + 1), 2 * s.ffn_hidden_size * s.hidden_size)


def _pad(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def _buffer_layout(params: list[tuple[int, bool]], *, distributed: bool, dp: int) -> tuple[int, list[tuple[int, int]]]:
    """Megatron DDP's contiguous buffer (``_ParamAndGradBuffer``, one bucket without overlap): its
    element count and each parameter's ``(start, end)``. Parameters go in reverse order; with the
    distributed optimizer each starts at a multiple of 64 elements, a shared embedding gets a bucket of
    its own, and every bucket ends at a multiple of lcm(dp, 128)."""
    divisor = math.lcm(dp, 128)
    start, bucket_open, ranges = 0, False, []
    for numel, shared in reversed(params):
        if distributed:
            start = _pad(start, 64)
            if shared and bucket_open:
                start, bucket_open = _pad(start, divisor), False
        ranges.append((start, start + numel))
        start += numel
        bucket_open = True
        if distributed and shared:
            start, bucket_open = _pad(start, divisor), False
    total = _pad(start, divisor) if distributed and bucket_open else start
    return total, ranges


def _shard_numel(ranges: list[tuple[int, int]], total: int, dp: int) -> int:
    """The most parameter elements any data-parallel rank's shard ``[r * total / dp, (r + 1) * total / dp)``
    of the buffer covers (what the distributed optimizer keeps state for on that rank)."""
    size = total // dp
    return max(sum(max(0, min(end, (r + 1) * size) - max(start, r * size)) for start, end in ranges)
               for r in range(dp))


# ----------------------------------------------------------------------------------------- activations


def layer_activation_bytes(
    dims: _Dims,
    *,
    tokens: int,
    seq: int,
    layer_spec: str,
    recompute: str,
    act_bytes: int,
    gpu: bool,
) -> int:
    """Bytes one decoder layer saves for its backward, for a micro-batch of ``tokens`` = b x ``seq``.

    Local layer spec, no recompute (each term counted on CPU with saved_tensors_hooks, exact there)::

        tokens x (6h + heads*d + 5 ffn + 3 heads*d) x act_bytes   norms (input, normalised, output, twice;
                                                                  4h on GPU, where torch's fused RMSNorm
                                                                  keeps no normalised copy), attention
                                                                  context, MLP (fc1 out 2f, SiLU out,
                                                                  product, one more f), q / k / v in the
                                                                  batched-matmul layout (k, v expanded to
                                                                  every head)
      + tokens x 2 x 4                                            RMSNorm's fp32 1/rms, twice
      + tokens x seq x heads x P                                  attention probabilities: fp32 softmax
                                                                  output (P = 4), plus its bf16 copy for the
                                                                  second batched matmul on GPU (P = 6)
      + seq x seq                                                 the boolean causal mask
      + 4 x seq x d x act_bytes                                   RoPE cos / sin of q and k

    ``selective`` (core attention recomputed) drops the probabilities, the mask and the three batched
    copies and keeps the attention's inputs instead: q and k after RoPE (heads*d + groups*d) and the
    fused QKV output that v is a view of ((heads + 2 groups) d). ``full`` keeps only a recompute unit's
    input (``tokens x h``; see :func:`_update_activations`).

    Transformer Engine spec (fused attention; from TE's saved tensors, not measured here)::

        tokens x (4h + (heads + 2 groups) d + (heads + groups) d + heads*d + 5 ffn) x act_bytes
      + tokens x (2 x 4 + heads x 4)                              RMSNorm 1/rms, softmax log-sum-exp

    (TE's fused attention keeps q, k, v and its output, no [seq, seq] tensor; 'selective' changes nothing
    there.) ``heads``, ``groups``, ``ffn`` are this TP rank's; ``h`` is whole (no sequence parallelism).
    """
    h, d, heads, groups, ffn = dims.h, dims.d, dims.heads, dims.groups, dims.ffn
    if layer_spec == "te":
        per_token = 4 * h + (heads + 2 * groups) * d + (heads + groups) * d + heads * d + 5 * ffn
        return tokens * per_token * act_bytes + tokens * (2 * _FP32 + heads * _FP32)
    # RMSNorm keeps its input (and, on CPU, its normalised output); the next linear keeps the output
    per_token = (6 if not gpu else 4) * h + heads * d + 5 * ffn
    probs = tokens * seq * heads * (_FP32 + (act_bytes if gpu else 0))
    core = probs + seq * seq * _BOOL + tokens * 3 * heads * d * act_bytes
    if recompute == "selective":
        core = tokens * (heads * d + groups * d + (heads + 2 * groups) * d) * act_bytes
    return tokens * per_token * act_bytes + tokens * 2 * _FP32 + core + 4 * seq * d * act_bytes


def _attention_transient_bytes(dims: _Dims, *, tokens: int, seq: int, layer_spec: str, gpu: bool,
                               backward: bool) -> int:
    """Live [b, heads, seq, seq] tensors of one local-spec attention beyond what it saves. Backward: the
    probabilities' and scores' gradients (measured on an H100: 10 bytes per element in bf16; 8 on CPU in
    fp32). A no-grad forward: the scores, their fp32 copy, the fp32 softmax and its bf16 copy, all at
    once (12 bytes per element on GPU, measured; 8 on CPU). TE's fused attention keeps none."""
    if layer_spec == "te":
        return 0
    per_element = (10 if backward else 12) if gpu else 8
    return tokens * seq * dims.heads * per_element


# --------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class _Rank:
    """One kind of rank: a pipeline stage, and whether it feeds (and holds) an engine."""

    stage: int
    feeds_engine: bool
    count: int  # ranks of this kind in the world

    @property
    def name(self) -> str:
        return f"stage {self.stage}" + (", engine" if self.feeds_engine else "")


@dataclasses.dataclass
class MemoryPlan:
    """A run's memory, per phase, for its largest rank (GPU) or its host (CPU); see the module."""

    fits: bool
    peak_phase: str
    peak_bytes: int
    """Bytes checked against ``device_bytes``: the largest rank's peak (GPU) or the host's (CPU: all
    local ranks together)."""
    device_bytes: int
    items: dict[str, int]
    """Bytes per item at the peak phase (they add up to ``peak_bytes``)."""
    phases: dict[str, dict[str, int]]
    offload_optimizer: bool
    """What ``memory.offload_optimizer`` resolved to ('auto': on only when the plan needs it)."""
    device: str
    settings: dict[str, Any]
    ranks: dict[str, dict[str, dict[str, int]]]
    """Every kind of rank's phases (name -> phase -> item -> bytes)."""
    peak_rank: str
    notes: list[str]

    @property
    def headroom(self) -> float:
        """Fraction of ``device_bytes`` left at the peak (negative when it does not fit)."""
        return 1.0 - self.peak_bytes / self.device_bytes if self.device_bytes else float("-inf")

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    def table(self) -> str:
        """The items x phases of the peak rank, the peak and the verdict, as text."""
        s = self.settings
        if self.device == "gpu":
            where = f"{s['world_size']} x GPU ({_gib(self.device_bytes)} each)"
        else:
            where = (f"{s['world_size']} CPU process{'es' if s['world_size'] > 1 else ''} ({_gib(self.device_bytes)}"
                     f" of RAM for {s['local_world_size']} local rank{'s' if s['local_world_size'] > 1 else ''})")
        lines = [
            f"memory plan: {s['model']} on {where}; TP={s['tp']} PP={s['pp']} DP={s['dp']}",
            f"micro-batch: {s['micro_batch']}; recompute {s['recompute']}; layer spec {s['layer_spec']};"
            f" logprob chunk {s['logprob_chunk_size'] or 'all'}; dtype {s['dtype']}",
            f"optimizer: {'distributed' if s['distributed_optimizer'] else 'replicated'},"
            f" offload {'on' if self.offload_optimizer else 'off'}; reference:"
            f" {s['reference']}; engine: {s['engine']}"
            + (f"; critic: {s['critic']}" if "critic" in self.phases else ""),
            f"{'per rank' if self.device == 'gpu' else 'host'}: {self.peak_rank}",
            f"{'item':<15}" + "".join(f"{p:>11}" for p in self.phases),
        ]
        for item in ITEMS:
            if any(self.phases[p].get(item, 0) for p in self.phases):
                lines.append(f"{item:<15}" + "".join(f"{_gib(self.phases[p].get(item, 0)):>11}" for p in self.phases))
        lines.append(f"{'total':<15}" + "".join(f"{_gib(self.total(p)):>11}" for p in self.phases))
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"peak: {self.peak_phase} {_gib(self.peak_bytes)} of {_gib(self.device_bytes)}"
                     f" ({100 * self.peak_bytes / self.device_bytes:.0f}%, headroom {100 * self.headroom:.0f}%):"
                     f" {verdict}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """One JSON-ready object: fits, peak_phase, peak_bytes, gpu_bytes (= device_bytes), items,
        phases, offload_optimizer, headroom, settings, ranks, notes."""
        return {"fits": self.fits, "peak_phase": self.peak_phase, "peak_bytes": self.peak_bytes,
                "gpu_bytes": self.device_bytes, "device_bytes": self.device_bytes, "device": self.device,
                "headroom": self.headroom, "items": dict(self.items), "phases": self.phases,
                "offload_optimizer": self.offload_optimizer, "settings": self.settings, "peak_rank": self.peak_rank,
                "ranks": self.ranks, "notes": list(self.notes)}

    def refusal(self) -> str:
        """Why the run does not fit: the largest items at the peak and the settings that shrink them."""
        head = (f"the memory plan does not fit: {self.peak_phase} needs {_gib(self.peak_bytes)} on "
                f"{'each GPU' if self.device == 'gpu' else 'this host'} ({self.peak_rank}), "
                f"{_gib(self.device_bytes)} available")
        if self.fits:
            head = f"the memory plan fits: {self.peak_phase} needs {_gib(self.peak_bytes)} of {_gib(self.device_bytes)}"
        largest = sorted(((b, i) for i, b in self.items.items() if b > 0 and i != "runtime"), reverse=True)[:4]
        lines = [head + ". Largest items: " + ", ".join(f"{i} {_gib(b)}" for b, i in largest) + "."]
        for _, item in largest:
            hint = self._hint(item)
            if hint:
                lines.append(f"  {item}: {hint}")
        lines.append("  (megatron-rl plan CONFIG --gpus N prints the whole table; docs/memory.md explains it)")
        return "\n".join(lines)

    def _hint(self, item: str) -> str:
        s = self.settings
        hints = {
            "activations": [] if s["recompute"].startswith("full") else ["model.recompute=full"],
            "logits": ["algorithm.logprob_chunk_size=512 (or smaller)"],
            "optimizer": [] if s["distributed_optimizer"] else ["optim.use_distributed_optimizer=true"],
            "grads": [],
            "params": [],
            "reference": [] if s["reference"].startswith("offloaded") else ["memory.offload_reference=on"],
            "critic": ([] if s["critic"].endswith("distributed optimizer") else
                       ["critic.optim.use_distributed_optimizer=true"]) +
                      ([] if self.offload_optimizer else ["memory.offload_optimizer=on (the critic's gradients and "
                                                          "Adam state leave the device outside its update)"]),
            "engine": [],
            "sync_buffers": [],
            "optimizer_step": ["optim.use_distributed_optimizer=true"] if not s["distributed_optimizer"] else [],
        }.get(item, [])
        if item in ("activations", "logits") and self.peak_phase == "critic":
            hints = ["model.recompute=full"] if not s["recompute"].startswith("full") else []
            hints.append("a smaller critic.micro_batch_size or critic.max_tokens_per_micro_batch")
        elif item in ("activations", "logits"):
            hints += ["a smaller algorithm.max_tokens_per_micro_batch" if s["token_budget"]
                      else "a smaller algorithm.micro_batch_size or algorithm.max_tokens_per_micro_batch"]
            if s["layer_spec"] == "local" and self.device == "gpu":
                hints.append("model.layer_spec=te (fused attention, needs transformer_engine)")
        if item in ("optimizer", "grads") and not self.offload_optimizer and self.device == "gpu":
            hints.append("memory.offload_optimizer=on (helps every phase but update and step)")
        if item == "engine" and self.device == "gpu":
            hints.append("a smaller rollout.gpu_memory_utilization")
            if not s["sleep"]:
                hints.append("rollout.enable_sleep_mode=true")
        if item == "engine" and self.device == "cpu":
            hints.append("a smaller rollout.kv_cache_gib")
        if item in ("params", "grads", "optimizer", "reference", "activations") and self.device == "gpu":
            hints.append("a larger parallel.tp or parallel.pp (more GPUs per replica)")
        return "; ".join(hints)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if abs(num_bytes) >= 0.1 * GIB else f"{num_bytes / MIB:.0f} MiB"


def hf_config_for(cfg: Config) -> Any:
    """The HF config of ``cfg.model.path`` read from its config.json alone (a directory holding only
    config.json is enough); the tiny model's config for 'tiny'.

    Raises:
        ValueError: no config.json at the path.
    """
    from megatron_rl.trainer.config import TINY_MODEL

    if cfg.model.path == TINY_MODEL:
        from transformers import Qwen2Config

        from megatron_rl.testing import DEFAULT_CONFIG, TOKENIZER_VOCAB_SIZE

        return Qwen2Config(**{**DEFAULT_CONFIG, "vocab_size": TOKENIZER_VOCAB_SIZE,
                              "num_hidden_layers": cfg.model.tiny_layers})
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        from megatron_rl.models import resolve_model_path

        path = resolve_model_path(cfg.model.path, fetch=False)
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path={cfg.model.path!r} has no config.json (the plan needs only that file)")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=False)


def plan_run(
    cfg: Config,
    hf_config: Any,
    *,
    num_gpus: int,
    device: str,
    device_bytes: int | None = None,
    local_world_size: int | None = None,
) -> MemoryPlan:
    """The memory plan of ``cfg`` on ``num_gpus`` processes (one per GPU; on CPU, processes).

    Args:
        cfg: the run's config (its parallel layout, micro-batches, recompute, memory settings...).
        hf_config: the model's HF config (:func:`hf_config_for`).
        num_gpus: the world size (TP x PP x DP).
        device: "gpu" (bf16 with ``optim.bf16``, a bf16 engine sized by ``gpu_memory_utilization``) or
            "cpu" (fp32 everywhere, a vLLM CPU engine with ``rollout.kv_cache_gib``).
        device_bytes: memory per GPU, or the host's RAM on CPU; None: ``memory.device_memory_gib`` if
            set, else 80 GiB (GPU) / this host's available RAM (CPU).
        local_world_size: processes per host (CPU: they share its RAM); default ``num_gpus``.

    Raises:
        ValueError: a device other than "gpu"/"cpu", or a layout that does not divide the world or the model.
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r}; allowed: {', '.join(DEVICES)}")
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if num_gpus < 1 or num_gpus % (tp * pp):
        raise ValueError(f"{num_gpus} processes cannot hold parallel.tp={tp} x parallel.pp={pp} replicas")
    shape = GPTShape.from_hf(hf_config)
    if shape.num_layers % pp:
        raise ValueError(f"parallel.pp={pp} does not divide the model's {shape.num_layers} layers")
    if shape.num_attention_heads % tp or shape.num_query_groups % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the model's {shape.num_attention_heads} heads and "
                         f"{shape.num_query_groups} KV heads")
    if device_bytes is None:
        gib = cfg.memory.device_memory_gib
        device_bytes = int(gib * GIB) if gib else (80 * GIB if device == "gpu" else _available_ram())
    local = num_gpus if local_world_size is None else local_world_size
    builder = _Builder(cfg, _Dims(shape, tp, pp), num_gpus=num_gpus, device=device, device_bytes=device_bytes,
                       local_world_size=local)
    mode = cfg.memory.offload_optimizer
    if mode == "auto":
        plan = builder.build(offload_optimizer=False)
        if not plan.fits:
            offloaded = builder.build(offload_optimizer=True)
            if offloaded.peak_bytes < plan.peak_bytes:
                plan = offloaded
        return plan
    return builder.build(offload_optimizer=mode == "on")


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class _Builder:
    """Computes a :class:`MemoryPlan` (one instance per plan_run call)."""

    def __init__(self, cfg: Config, dims: _Dims, *, num_gpus: int, device: str, device_bytes: int,
                 local_world_size: int) -> None:
        self.cfg, self.dims, self.device = cfg, dims, device
        self.gpu = device == "gpu"
        self.world, self.device_bytes, self.local = num_gpus, device_bytes, min(local_world_size, num_gpus)
        self.tp, self.pp = dims.tp, dims.pp
        self.dp = num_gpus // (dims.tp * dims.pp)
        self.bf16 = self.gpu and cfg.optim.bf16
        self.param_bytes = 2 if self.bf16 else 4
        self.engine_bytes = 2 if self.gpu else 4  # vLLM: bf16 on GPU, fp32 on CPU
        self.distributed = cfg.optim.use_distributed_optimizer
        mode = cfg.memory.offload_reference
        self.offload_reference = self.gpu if mode == "auto" else mode == "on"
        self.reference = cfg.algorithm.kl_coef > 0 or cfg.algorithm.kl_in_reward
        self.critic = cfg.algorithm.advantage == "gae"  # PPO with a critic: a second model (see ``critic``)
        self.critic_bf16 = self.gpu and cfg.critic.optim.bf16
        self.phase_names = CRITIC_PHASES if self.critic else PHASES
        self.layer_spec = self._layer_spec()
        self.sleep = self.gpu and cfg.rollout.enable_sleep_mode and cfg.rollout.mode == "colocated"

    def _layer_spec(self) -> str:
        spec = self.cfg.model.layer_spec
        if spec == "auto":  # as megatron.model.resolve_layer_spec decides on the machine that trains
            import importlib.util

            return "te" if self.gpu and importlib.util.find_spec("transformer_engine") is not None else "local"
        return spec

    # -- micro-batches -------------------------------------------------------------------------------

    def _micro_batch(self, critic: bool = False) -> tuple[int, int, int, int, str]:
        """``(tokens, seq, scored tokens, micro-batches in a mini-batch, description)`` of the largest
        micro-batch (the policy's; with ``critic`` the critic's, of ``critic.micro_batch_size`` or its
        ``critic.max_tokens_per_micro_batch``). Fixed micro-batches: micro_batch_size rows of the longest
        prompt and response (right padding makes every row that long). A token budget B: at most max(B, seq)
        tokens (a longer
        row runs alone), each row at most seq long, so the [seq, seq] terms are bounded by tokens x seq;
        every token is counted as scored (an upper bound: packed short rows may be mostly response)."""
        cfg = self.cfg
        prompt, response = cfg.data.max_prompt_length, cfg.rollout.max_response_length
        seq = prompt + response
        local_prompts = max(1, cfg.data.batch_size // self.dp)
        sequences = (cfg.algorithm.mini_batch_size or local_prompts) * cfg.rollout.n
        owner = cfg.critic if critic else cfg.algorithm
        budget = owner.max_tokens_per_micro_batch
        if budget > 0:
            tokens = min(max(budget, seq), sequences * seq)
            return tokens, seq, tokens, -(-sequences * seq // tokens), f"token budget {budget} (rows up to {seq})"
        rows = min(sequences, owner.micro_batch_size)
        return rows * seq, seq, rows * response, -(-sequences // rows), f"{rows} x {seq} tokens (fixed)"

    # -- items ---------------------------------------------------------------------------------------

    def _optimizer_step_bytes(self, stage: int, critic: bool = False) -> int:
        """Temporaries of the optimizer step (see the module) of the policy or, with ``critic``, the
        critic: Transformer Engine's fused Adam (used by Megatron when TE is installed; assumed with
        model.layer_spec=te) needs none."""
        if self.layer_spec == "te":
            return 0
        params = self._critic_param_numels(stage) if critic else self.dims.stage_param_numels(stage)
        distributed = self.cfg.critic.optim.use_distributed_optimizer if critic else self.distributed
        if not self.gpu:
            return max(n for n, _ in params) * _FP32
        total, ranges = _buffer_layout(params, distributed=distributed, dp=self.dp)
        shard = _shard_numel(ranges, total, self.dp) if distributed else sum(n for n, _ in params)
        return shard * _FP32

    def _critic_param_numels(self, stage: int) -> list[tuple[int, bool]]:
        """The critic's parameters on ``stage`` (megatron/critic.py): the embedding (never shared), the
        layers, the final norm and the value head's weight and bias."""
        dims = self.dims
        params = [(dims.vocab * dims.h, False)] if stage == 0 else []
        params += [(n, False) for _ in range(dims.layers) for n in dims.layer_param_numels()]
        if stage == self.pp - 1:
            params += [(dims.h, False), (dims.h, False), (1, False)]
        return params

    def _state(self, params: list[tuple[int, bool]], *, distributed: bool, bf16: bool) -> dict[str, int]:
        """Parameters, fp32 gradient buffer and Adam state of one model stage's ``params``."""
        numel = sum(n for n, _ in params)
        total, ranges = _buffer_layout(params, distributed=distributed, dp=self.dp)
        shard = _shard_numel(ranges, total, self.dp) if distributed else numel
        # Adam's exp_avg and exp_avg_sq (fp32); bf16 training adds fp32 master weights
        return {
            "params": (total if distributed else numel) * (2 if bf16 else 4),
            "grads": total * _FP32,  # grad_reduce_in_fp32: one fp32 buffer, padded like the params
            "optimizer": shard * (2 * _FP32 + (_FP32 if bf16 else 0)),
        }

    def _params_and_state(self, stage: int) -> dict[str, int]:
        params = self.dims.stage_param_numels(stage)
        state = self._state(params, distributed=self.distributed, bf16=self.bf16)
        state["reference"] = sum(n for n, _ in params) * self.param_bytes if self.reference else 0
        if self.critic:
            critic = self._state(self._critic_param_numels(stage), bf16=self.critic_bf16,
                                 distributed=self.cfg.critic.optim.use_distributed_optimizer)
            state.update({f"critic_{key}": value for key, value in critic.items()})
        return state

    def _update_activations(self, stage: int, critic: bool = False) -> tuple[int, int, int]:
        """``(saved, logits transient, backward transient)`` of the update on ``stage`` (the policy's, or with
        ``critic`` the critic's: its micro-batch and dtype, and no output layer: its value head keeps the
        final hidden states of the responses, as the policy's loss does, and needs no logits)."""
        dims, cfg = self.dims, self.cfg
        tokens, seq, scored, num_micro, _ = self._micro_batch(critic)
        act = (2 if self.critic_bf16 else 4) if critic else self.param_bytes
        recompute, method, unit = cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers
        none = layer_activation_bytes(dims, tokens=tokens, seq=seq, layer_spec=self.layer_spec, recompute="none",
                                      act_bytes=act, gpu=self.gpu)
        if recompute == "full":
            checkpointed = dims.layers if method == "uniform" else min(unit, dims.layers)
            units = dims.layers // unit if method == "uniform" else checkpointed
            layers = units * tokens * dims.h * act + (dims.layers - checkpointed) * none
            layers += seq * dims.d * _FP32  # the RoPE frequencies, kept once
            recompute_unit = (unit if method == "uniform" else 1) * none  # re-run in the backward, one unit at a time
        else:
            layers = dims.layers * layer_activation_bytes(dims, tokens=tokens, seq=seq, layer_spec=self.layer_spec,
                                                          recompute=recompute, act_bytes=act, gpu=self.gpu)
            recompute_unit = 0
        last = stage == self.pp - 1
        saved = layers
        if stage == 0:
            saved += tokens * _INT64  # the input ids of the embedding
        if last:
            # final norm: its input (and on CPU its normalised output), the 1/rms; the scored tokens' hidden states
            norm = (1 if self.gpu else 2) * dims.h * act + _FP32
            saved += tokens * norm + scored * (dims.h * act + _LOSS_BYTES_PER_SCORED_TOKEN)
            saved += tokens * _LOSS_BYTES_PER_TOKEN
        in_flight = min(num_micro, self.pp - stage)  # 1F1B keeps pp - stage micro-batches before the first backward
        logits = self._logits_bytes(scored, backward=True) if last and not critic else 0
        backward = recompute_unit + _attention_transient_bytes(dims, tokens=tokens, seq=seq, layer_spec=self.layer_spec,
                                                               gpu=self.gpu, backward=True)
        return saved * in_flight, logits, backward

    def _logits_bytes(self, scored: int, *, backward: bool) -> int:
        """The output layer + softmax of one chunk of ``scored`` tokens (megatron/logprobs.py): forward
        the logits in the model dtype, their fp32 copy (one buffer on fp32) and its exp; backward two fp32
        chunk buffers and the logits' gradient in the weight dtype, the output weight's gradient (and its
        fp32 accumulator when there are several chunks), the hidden states' gradient."""
        dims, act = self.dims, self.param_bytes
        chunk_size = self.cfg.algorithm.logprob_chunk_size
        chunk = min(chunk_size, scored) if chunk_size > 0 else scored
        cast = act if act != _FP32 else 0
        forward = chunk * dims.vocab * (cast + 2 * _FP32)
        if not backward:
            return forward
        several = chunk_size > 0 and scored > chunk_size
        weight = dims.vocab * dims.h
        back = (chunk * dims.vocab * (2 * _FP32 + cast) + weight * (act + (_FP32 if several else 0))
                + scored * dims.h * act)
        return max(forward, back)

    def _logprob_activations(self, stage: int) -> int:
        """Largest live tensors of one no-grad forward (old / reference logprobs): the residual stream in
        and out, plus the larger of one layer's intermediates (bounded by what it would save for a
        backward) and, on the last stage, the scored hidden states with one chunk of logits (the layers'
        intermediates are gone by then)."""
        dims = self.dims
        tokens, seq, scored, _, _ = self._micro_batch()
        act = self.param_bytes
        layer = _attention_transient_bytes(dims, tokens=tokens, seq=seq, layer_spec=self.layer_spec, gpu=self.gpu,
                                           backward=False)
        layer += tokens * ((dims.heads + 2 * dims.groups) * dims.d + 3 * dims.heads * dims.d) * act  # qkv, q/k/v
        layer = max(layer, tokens * 4 * dims.ffn * act)  # or the MLP's fc1 output, SiLU and product
        head = scored * dims.h * act + self._logits_bytes(scored, backward=False) if stage == self.pp - 1 else 0
        return 2 * tokens * dims.h * act + max(layer, head)

    def _engine(self) -> dict[str, int]:
        """The engine's bytes by state: awake, asleep, weights-only (the sync phase)."""
        weights = self.dims.hf_numel() * self.engine_bytes
        if not self.gpu:
            total = weights + int(self.cfg.rollout.kv_cache_gib * GIB) + CPU_ENGINE_OVERHEAD_BYTES
            return {"awake": total, "asleep": total, "weights": total, "weights_only": weights}
        awake = math.ceil(self.cfg.rollout.gpu_memory_utilization * self.device_bytes)
        if not self.sleep:
            return {"awake": awake, "asleep": awake, "weights": awake, "weights_only": weights}
        return {"awake": awake, "asleep": ENGINE_ASLEEP_BYTES, "weights": weights + ENGINE_ASLEEP_BYTES,
                "weights_only": weights}

    def _sync_buffers(self) -> tuple[int, int]:
        """``(kept, reload transient)`` of the weight sync on the feeding rank (weight_sync/sync.py): one
        bucket of HF tensors (at least the largest fused group) and, at TP > 1, the other ranks' shards of
        it; the engine's reload re-makes one fused group at a time."""
        from megatron_rl.weight_sync.plan import DEFAULT_BUCKET_BYTES

        largest = self.dims.largest_hf_unit() * self.engine_bytes
        bucket = min(max(DEFAULT_BUCKET_BYTES, largest), self.dims.hf_numel() * self.engine_bytes)
        return int(bucket * (1 + (self.tp - 1) / self.tp)), largest

    # -- phases --------------------------------------------------------------------------------------

    def _rank_phases(self, rank: _Rank, offload_optimizer: bool) -> dict[str, dict[str, int]]:
        state = self._params_and_state(rank.stage)
        saved, logits, backward = self._update_activations(rank.stage)
        engine = self._engine() if rank.feeds_engine and self.cfg.rollout.mode == "colocated" else None
        kept_sync, reload = self._sync_buffers() if rank.feeds_engine else (0, 0)
        reference_on = state["reference"] if not self.offload_reference else 0
        # gradient buffers are released and (GPU) optimizer state moved to the host outside the update
        offloaded = {"grads": 0, "optimizer": 0 if self.gpu else state["optimizer"]} if offload_optimizer else {}
        critic_state = sum(state.get(f"critic_{k}", 0) for k in ("params", "grads", "optimizer"))
        critic_kept = critic_state  # outside its update: offloaded like the policy's (grads released, Adam on the host)
        if offload_optimizer:
            critic_kept = state.get("critic_params", 0) + (0 if self.gpu else state.get("critic_optimizer", 0))
        phases: dict[str, dict[str, int]] = {}
        for phase in self.phase_names:
            items = {"params": state["params"], "grads": state["grads"], "optimizer": state["optimizer"],
                     "reference": reference_on, "critic": critic_kept, "engine": 0, "activations": 0, "logits": 0,
                     "optimizer_step": 0, "sync_buffers": kept_sync}
            if phase not in ("update", "step"):
                items.update(offloaded)
            if engine is not None:
                items["engine"] = {"generate": engine["awake"], "sync": engine["weights"]}.get(phase, engine["asleep"])
            if phase == "logprob":
                items["reference"] = state["reference"]
                items["activations"] = self._logprob_activations(rank.stage)
            elif phase == "update":
                items["activations"] = saved
                items["logits"] = max(logits, backward)
            elif phase == "step":
                items["optimizer_step"] = self._optimizer_step_bytes(rank.stage)
            elif phase == "critic":  # the critic's forward, backward and optimizer step (see ``critic``)
                critic_saved, _, critic_backward = self._update_activations(rank.stage, critic=True)
                items.update({"critic": critic_state, "activations": critic_saved, "logits": critic_backward,
                              "optimizer_step": self._optimizer_step_bytes(rank.stage, critic=True)})
            elif phase == "sync":
                items["sync_buffers"] = kept_sync + reload
            phases[phase] = items
        for items in phases.values():
            items["runtime"] = self._runtime(items)
        return phases

    def _runtime(self, items: Mapping[str, int]) -> int:
        if not self.gpu:
            return CPU_PROCESS_BASELINE_BYTES + int(CPU_ALLOCATOR_SLACK * sum(items.values()))
        trainer = sum(b for item, b in items.items() if item != "engine")
        return CUDA_RUNTIME_BYTES + max(ALLOCATOR_SLACK_MIN_BYTES, int(ALLOCATOR_SLACK * trainer))

    def _ranks(self) -> list[_Rank]:
        ranks = []
        for stage in range(self.pp):
            feeders = self.dp if stage == 0 else 0
            if feeders:
                ranks.append(_Rank(stage, True, feeders))
            others = self.dp * self.tp - feeders
            if others:
                ranks.append(_Rank(stage, False, others))
        return ranks

    def build(self, *, offload_optimizer: bool) -> MemoryPlan:
        ranks = self._ranks()
        per_rank = {rank.name: self._rank_phases(rank, offload_optimizer) for rank in ranks}
        if self.gpu:
            def peak(name: str) -> tuple[int, str]:
                return max((sum(per_rank[name][p].values()), p) for p in self.phase_names)

            peak_rank = max(per_rank, key=lambda name: peak(name)[0])
            phases = per_rank[peak_rank]
        else:  # the host holds its local ranks: the first local_world_size of the world, in rank order
            phases = {p: dict.fromkeys(ITEMS, 0) for p in self.phase_names}
            host = self._host_ranks(ranks)
            for rank, count in host:
                for p in self.phase_names:
                    for item, value in per_rank[rank.name][p].items():
                        phases[p][item] += count * value
            peak_rank = ", ".join(f"{count} x {rank.name}" for rank, count in host)
        peak_phase = max(self.phase_names, key=lambda p: sum(phases[p].values()))
        peak_bytes = sum(phases[peak_phase].values())
        engine = self._engine()
        tokens, seq, scored, num_micro, micro_text = self._micro_batch()
        notes = []
        engine_starts = not (self.gpu and self.cfg.rollout.mode == "colocated"
                             and engine["awake"] <= engine["weights_only"])
        if not engine_starts:
            notes.append(f"rollout.gpu_memory_utilization={self.cfg.rollout.gpu_memory_utilization} leaves the "
                         f"engine no KV cache beside its {_gib(engine['weights_only'])} of weights")
        if self.cfg.rollout.mode == "separate":
            notes.append("rollout.mode=separate: the engines run on GPUs of their own, not planned here")
        fits = peak_bytes <= self.device_bytes and engine_starts
        cfg = self.cfg
        recompute = cfg.model.recompute
        if recompute == "full":
            recompute = f"full/{cfg.model.recompute_method}/{cfg.model.recompute_num_layers}"
        settings = {
            "model": f"{self.dims.shape.model_type} {self.dims.shape.num_layers} layers, hidden {self.dims.h}, "
                     f"vocab {self.dims.shape.vocab_size}",
            "world_size": self.world, "local_world_size": self.local, "tp": self.tp, "pp": self.pp, "dp": self.dp,
            "micro_batch": micro_text, "micro_batch_tokens": tokens, "seq": seq, "scored_tokens": scored,
            "micro_batches": num_micro, "token_budget": cfg.algorithm.max_tokens_per_micro_batch,
            "recompute": recompute, "layer_spec": self.layer_spec,
            "logprob_chunk_size": cfg.algorithm.logprob_chunk_size,
            "dtype": "bf16" if self.bf16 else "fp32", "distributed_optimizer": self.distributed,
            "critic": (f"a second model, {'bf16' if self.critic_bf16 else 'fp32'}, "
                       f"{'distributed' if cfg.critic.optim.use_distributed_optimizer else 'replicated'} optimizer"
                       if self.critic else "none"),
            "reference": ("none (kl_coef 0)" if not self.reference else
                          "offloaded between its forwards" if self.offload_reference else "on the device"),
            "engine": self._engine_text(engine), "sleep": self.sleep,
        }
        return MemoryPlan(fits=fits, peak_phase=peak_phase, peak_bytes=peak_bytes, device_bytes=self.device_bytes,
                          items=dict(phases[peak_phase]), phases=phases, offload_optimizer=offload_optimizer,
                          device=self.device, settings=settings, ranks=per_rank, peak_rank=peak_rank, notes=notes)

    def _host_ranks(self, ranks: list[_Rank]) -> list[tuple[_Rank, int]]:
        """The kinds of rank among global ranks 0 .. local_world_size - 1 (Megatron's order: TP fastest,
        then DP, then PP), with their counts."""
        counts: dict[_Rank, int] = {}
        by_key = {(r.stage, r.feeds_engine): r for r in ranks}
        for global_rank in range(self.local):
            tp_rank = global_rank % self.tp
            stage = global_rank // (self.tp * self.dp)
            rank = by_key[(stage, tp_rank == 0 and stage == 0)]
            counts[rank] = counts.get(rank, 0) + 1
        return list(counts.items())

    def _engine_text(self, engine: dict[str, int]) -> str:
        if self.cfg.rollout.mode == "separate":
            return "separate (own GPUs)"
        where = f"on the {self.dp} generating rank{'s' if self.dp > 1 else ''} only"
        if not self.gpu:
            return f"{_gib(engine['awake'])} (fp32 weights + kv_cache_gib), {where}"
        state = "sleeps while the trainer works" if self.sleep else "never sleeps"
        return (f"{_gib(engine['awake'])} awake (gpu_memory_utilization {self.cfg.rollout.gpu_memory_utilization}), "
                f"{state}, {where}")


# ----------------------------------------------------------------------------------------- start check


def check_run_fits(cfg: Config, hf_config: Any, *, world_size: int, local_world_size: int) -> MemoryPlan:
    """The plan of ``cfg`` against this machine, before anything is allocated: on GPU the device's total
    (``torch.cuda.mem_get_info``; ``memory.device_memory_gib`` when set) less what other processes hold
    on it now; on CPU the host's available RAM, shared by its ``local_world_size`` ranks. Returns the
    plan; with ``memory.check`` off it never raises.

    Raises:
        InsufficientMemoryError: the plan does not fit (the message is :meth:`MemoryPlan.refusal`).
    """
    import torch

    gpu = torch.cuda.is_available() and cfg.trainer.device != "cpu"
    gib = cfg.memory.device_memory_gib
    if gpu:
        free, total = torch.cuda.mem_get_info()
        # In use and not PyTorch's: this process's CUDA context (planned in `runtime`, so given back here
        # up to CUDA_RUNTIME_BYTES) and whatever other processes hold (unavailable to the run).
        reserved = _own_cuda_bytes()
        outside = max(0, total - free - reserved)
        device_bytes = int(gib * GIB) if gib else total
        device_bytes = min(device_bytes, free + reserved + min(outside, CUDA_RUNTIME_BYTES))
    else:
        device_bytes = int(gib * GIB) if gib else _available_ram() + _own_rss() * local_world_size
    plan = plan_run(cfg, hf_config, num_gpus=world_size, device="gpu" if gpu else "cpu", device_bytes=device_bytes,
                    local_world_size=local_world_size)
    if cfg.memory.check and not plan.fits:
        raise InsufficientMemoryError(plan)
    return plan


def _own_cuda_bytes() -> int:
    """What this process already holds on its GPU through PyTorch (counted by the plan's items)."""
    import torch

    return int(torch.cuda.memory_reserved())


def _own_rss() -> int:
    """This process's resident memory (the plan counts a process baseline for each rank)."""
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def plan_json(plan: MemoryPlan) -> str:
    """``plan.to_json()`` as one line of JSON."""
    return json.dumps(plan.to_json(), sort_keys=True)
