"""The critic's role in a run (``algorithm.advantage='gae'``): its model and optimizer, the values of a
step's rollouts, its update on each mini-batch, and its part of the run checkpoint.

    critic = Critic(cfg, hf_config, model_dir, info)      # the trunk from model_dir, a fresh value head
    values = critic.values(batch)                          # (N, T-1), 0 outside the responses
    metrics = critic.train(batch, mini_batches, loss_mask=..., old_values=values, returns=returns, step=step)
    critic.save(checkpoint_dir); critic.load(checkpoint_dir)

The model, its loss and checkpoint format are :mod:`megatron_rl.megatron.critic`'s. The critic has the
policy's layout (``parallel``), layer spec and recompute settings (``model``), its own optimizer
(``critic.optim``) and micro-batches (``critic.micro_batch_size`` / ``max_tokens_per_micro_batch``). When
the policy's optimizer is offloaded (``memory.offload_optimizer``) the critic's is too: its state and
gradient buffers are on the device only during its update (:meth:`Critic.offload_optimizer`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from megatron_rl.megatron.critic import (
    CRITIC_DIR,
    critic_micro_batches,
    critic_train_step,
    forward_values,
    load_critic_checkpoint,
    save_critic_checkpoint,
)
from megatron_rl.megatron.offload import OptimizerOffload
from megatron_rl.megatron.optim import build_optimizer, set_lr, unwrap_ddp, wrap_ddp
from megatron_rl.megatron.parallel import ParallelInfo
from megatron_rl.megatron.train_step import count_valid_sequences, count_valid_tokens
from megatron_rl.trainer.batch import RolloutBatch
from megatron_rl.trainer.checkpoint import CheckpointManager

__all__ = ["Critic", "uses_critic"]


def uses_critic(cfg: Any) -> bool:
    """Whether a run of ``cfg`` has a critic: GAE advantages need values."""
    return cfg.algorithm.advantage == "gae"


class Critic:
    """The value model of one rank (its TP/PP stage), its optimizer and settings."""

    def __init__(self, cfg: Any, hf_config: Any, model_dir: Path, info: ParallelInfo) -> None:
        from megatron_rl.megatron.critic import build_critic

        self.cfg, self.hf_config, self.info = cfg.critic, hf_config, info
        model_cfg = cfg.model
        dtype = torch.bfloat16 if self.cfg.optim.uses_bf16 else torch.float32
        model = build_critic(hf_config, head_seed=self.cfg.head_seed, params_dtype=dtype, tp_size=info.tp_size,
                             pp_size=info.pp_size, pre_process=info.pp_rank == 0,
                             post_process=info.pp_rank == info.pp_size - 1, layer_spec=model_cfg.layer_spec,
                             recompute_granularity=model_cfg.recompute, recompute_method=model_cfg.recompute_method,
                             recompute_num_layers=model_cfg.recompute_num_layers)
        self._load_trunk(model, model_dir)
        self.model = wrap_ddp(model, self.cfg.optim)
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.updates = 0
        """Optimizer steps taken (the checkpoint's iteration); restored from a checkpoint."""
        self.offload: OptimizerOffload | None = None

    def offload_optimizer(self) -> None:
        """Keep the optimizer state and gradient buffers in host memory outside :meth:`train` (moved now)."""
        self.offload = OptimizerOffload(self.model, self.optimizer)
        self.offload.to_host()

    def _load_trunk(self, model: torch.nn.Module, model_dir: Path) -> None:
        from megatron_rl.checkpoint.hf_io import SafetensorsSource
        from megatron_rl.megatron.critic import load_hf_into_critic

        source = SafetensorsSource(model_dir)
        state = {name: source.read(name) for name in source.names()}
        info = self.info
        load_hf_into_critic(model, state, self.hf_config, tp_rank=info.tp_rank, tp_size=info.tp_size,
                            pp_rank=info.pp_rank, pp_size=info.pp_size)

    def load_hf(self, model_dir: Path) -> None:
        """Refill the trunk from ``model_dir`` (e.g. the SFT warm-up's model) and the optimizer's fp32
        master copies; the value head keeps its weights."""
        self._load_trunk(unwrap_ddp(self.model), model_dir)
        reload = getattr(self.optimizer, "reload_model_params", None)
        if reload is not None:
            reload()

    def values(self, batch: RolloutBatch) -> torch.Tensor:
        """The critic's values of this rank's rollouts at their response tokens, (N, T-1) fp32 (0
        elsewhere), in ``critic.micro_batch_size`` rows (or the critic's token budget). Collective over
        the model replica."""
        return forward_values(self.model, batch.input_ids, mask=batch.response_mask,
                              micro_batch_size=self.cfg.micro_batch_size,
                              max_tokens_per_micro_batch=self.cfg.max_tokens_per_micro_batch).cpu()

    def update(self, batch: RolloutBatch, rows: torch.Tensor, *, loss_mask: torch.Tensor, old_values: torch.Tensor,
               returns: torch.Tensor, step: int) -> dict[str, float]:
        """One optimizer step of the clipped value loss on the rows ``rows`` (a mini-batch) of this rank's
        ``batch``: targets ``returns``, clip around ``old_values`` (the values the advantages were computed
        with), tokens of ``loss_mask``, at the learning rate of training step ``step`` (``critic.optim``'s
        warmup counts training steps, as the policy's). Returns
        :func:`~megatron_rl.megatron.critic.critic_train_step`'s metrics (the same on every rank)."""
        micro_batches = critic_micro_batches(batch.input_ids, rows, loss_mask=loss_mask, old_values=old_values,
                                             returns=returns, micro_batch_size=self.cfg.micro_batch_size,
                                             max_tokens_per_micro_batch=self.cfg.max_tokens_per_micro_batch)
        set_lr(self.optimizer, self.cfg.optim.lr_at(step))
        settings = self.cfg.loss_settings()
        if settings.loss_agg == "seq-mean-token-sum-norm":  # a fixed constant: the batch's padded length
            settings = dataclasses.replace(settings, loss_agg_constant=batch.input_ids.shape[1] - 1)
        result = critic_train_step(self.model, self.optimizer, micro_batches,
                                   global_num_tokens=count_valid_tokens(micro_batches),
                                   global_num_seqs=count_valid_sequences(micro_batches), settings=settings)
        self.updates += 1
        return result

    def train(self, batch: RolloutBatch, mini_batches: list[list[torch.Tensor]], *, loss_mask: torch.Tensor,
              old_values: torch.Tensor, returns: torch.Tensor, step: int) -> dict[str, float]:
        """One :meth:`update` per mini-batch (``mini_batches[epoch]`` lists each epoch's row indices, the
        policy's), with the optimizer on the device meanwhile; returns the means over the updates as
        ``critic/<metric>``."""
        if self.offload is not None:
            self.offload.to_device()
        sums: dict[str, float] = {}
        updates = 0
        for epoch_batches in mini_batches:
            for rows in epoch_batches:
                for key, value in self.update(batch, rows, loss_mask=loss_mask, old_values=old_values,
                                              returns=returns, step=step).items():
                    sums[key] = sums.get(key, 0.0) + value
                updates += 1
        if self.offload is not None:
            self.offload.to_host()
        return {f"critic/{key}": value / updates for key, value in sums.items()}

    def check_resumable(self, checkpoints: CheckpointManager) -> None:
        """Refuse to resume a run directory whose newest checkpoint holds no critic (saved by a run
        without one): loading would fail on every checkpoint and the run would start over."""
        complete = checkpoints.complete()
        if complete and not (complete[-1][1] / CRITIC_DIR).is_dir():
            raise ValueError(f"algorithm.advantage='gae' needs a critic, but {complete[-1][1]} holds none (saved "
                             "by a run without a critic); use a new trainer.output_dir")

    def save(self, checkpoint_dir: Path) -> None:
        """The critic (model + optimizer + its update count) into ``checkpoint_dir``/critic. Collective."""
        save_critic_checkpoint(checkpoint_dir, self.model, self.optimizer, iteration=self.updates)

    def load(self, checkpoint_dir: Path) -> None:
        """Restore what :meth:`save` wrote (any layout). Collective; raises when the checkpoint holds no
        critic."""
        self.updates = load_critic_checkpoint(checkpoint_dir, self.model, self.optimizer)
