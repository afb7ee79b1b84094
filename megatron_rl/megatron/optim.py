"""Megatron ``DistributedDataParallel`` wrapping and the AdamW optimizer (Med-U1 defaults).

    ddp_model = wrap_ddp(model, OptimizerSettings())
    optimizer = build_optimizer(ddp_model, OptimizerSettings())

On CPU everything is fp32 (parameters, gradients, Adam state). On GPU with ``bf16=True`` the model is
built in bf16 (``build_gpt_model(..., params_dtype=torch.bfloat16)``) and Megatron keeps fp32 master
weights and fp32 gradient buffers. ``use_distributed_optimizer`` shards the fp32 master weights and
Adam moments over the data-parallel group (ZeRO-1); the model is then wrapped with the same flag.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["OptimizerSettings", "build_optimizer", "set_lr", "unwrap_ddp", "wrap_ddp"]


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW over the policy (defaults: Med-U1's verl recipe; constant learning rate, no warmup)."""

    lr: float = 1e-6
    """Learning rate, constant over training (after the warmup)."""
    warmup_steps: int = 0
    """Raise the learning rate linearly over this many training steps (0: none, as Med-U1). Adam's
    first steps move every weight by about lr whatever the gradient's size, so noisy RL gradients on
    a small model benefit from a warmup."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay, applied to every parameter (megatron-core 0.16 default, as verl)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (over all TP/PP/DP shards) to this; 0 turns clipping off."""
    use_distributed_optimizer: bool = False
    """Shard the fp32 master weights and Adam state over the data-parallel group (ZeRO-1): each
    data-parallel rank keeps 1/DP of them (the one switch for it; the model is wrapped to match)."""
    bf16: bool = False
    """bf16 parameters with fp32 master weights (GPU only). A training run on the CPU with bf16=true is
    refused at start (trainer.device); the CPU path is fp32 throughout."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name}={value!r} must lie in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps!r} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad={self.clip_grad!r} must be >= 0 (0 turns clipping off)")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based)."""
        return self.lr * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.lr

    @property
    def uses_bf16(self) -> bool:
        """Whether the model is built in bf16: ``bf16`` with CUDA (the trainer refuses bf16 without it)."""
        return self.bf16 and torch.cuda.is_available()


def wrap_ddp(model: torch.nn.Module, settings: OptimizerSettings) -> torch.nn.Module:
    """Wrap this rank's GPTModel stage in Megatron's ``DistributedDataParallel``.

    Gradients accumulate in one contiguous fp32 buffer per dtype and are averaged over the data-parallel
    group once per step, after the last micro-batch (no overlap). The model's config gets the hooks that
    Megatron's schedules call (``no_sync_func``, ``finalize_model_grads_func``: DP reduction and the tied
    embedding's all-reduce between the first and last pipeline stages).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    config = model.config
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = None
    return ddp_model


def set_lr(optimizer: Any, lr: float) -> None:
    """Set the learning rate of every parameter group of a Megatron optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a :func:`wrap_ddp` wrapper (the model itself if it is not wrapped)."""
    return getattr(model, "module", model)


def build_optimizer(ddp_model: torch.nn.Module, settings: OptimizerSettings) -> Any:
    """Megatron's AdamW (``get_megatron_optimizer``) over a :func:`wrap_ddp` model.

    Without apex / Transformer Engine Megatron falls back to ``torch.optim.AdamW``. Returns the
    ``MegatronOptimizer``; its ``step()`` clips the global gradient norm and returns
    ``(update_successful, grad_norm, num_zeros_in_grad)``.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if settings.use_distributed_optimizer and not ddp_model.ddp_config.use_distributed_optimizer:
        raise ValueError("use_distributed_optimizer=True but the model was wrapped without it (see wrap_ddp)")
    bf16 = settings.uses_bf16
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.beta1,
        adam_beta2=settings.beta2,
        adam_eps=settings.eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, [ddp_model])
