"""The GRPO loop: ``megatron-rl train CONFIG [overrides]``.

One step (:meth:`Trainer.step`)::

    prompts -> generate n responses each (rollout engine) -> score (reward modules)
      -> advantages -> old / reference logprobs (Megatron) -> policy update (ppo_epochs x mini-batches)
      -> weight sync to the engine -> log; validate every test_freq steps; checkpoint every save_freq

Processes: one per GPU (``torchrun --nproc-per-node N megatron-rl train ...``), or a single
process when started without torchrun. Every rank holds a Megatron stage; the first rank of each
model replica (TP x PP) also drives a colocated rollout engine, generates and scores that
replica's share of the prompts and sends the token tensors to the other ranks of its replica.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rl import algorithms
from megatron_rl.checkpoint.hf_io import remove_stale_temporaries
from megatron_rl.config import Config
from megatron_rl.data.dataset import PromptDataset, PromptExample, PromptSampler
from megatron_rl.megatron.forward import forward_logprobs
from megatron_rl.megatron.optim import build_optimizer, set_lr, unwrap_ddp
from megatron_rl.megatron.parallel import (
    ParallelInfo,
    destroy_parallel,
    init_parallel,
    local_world_env,
    model_parallel_group,
)
from megatron_rl.megatron.train_step import LossSettings, count_valid_sequences, count_valid_tokens, train_step
from megatron_rl.trainer import phases, setup
from megatron_rl.trainer.batch import RolloutBatch, broadcast_batch, make_micro_batches
from megatron_rl.trainer.checkpoint import CheckpointManager
from megatron_rl.trainer.metrics import METRICS_FILE, ROLLOUTS_FILE, MetricsWriter, PhaseTimer, truncate_step_records

__all__ = ["Trainer", "train"]

log = logging.getLogger(__name__)

ADVANTAGE_FUNCTIONS = {
    "grpo": algorithms.grpo_advantages,
    "dr_grpo": algorithms.dr_grpo_advantages,
    "rloo": algorithms.rloo_advantages,
    "reinforce_pp": algorithms.reinforce_pp_baseline_advantages,
}


def train(cfg: Config) -> Path:
    """Run ``cfg`` to its last step (resuming if asked); return the run directory."""
    if "RANK" not in os.environ:  # started without torchrun: a world of one process
        os.environ.update(local_world_env())
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer.run_dir


class Trainer:
    """Everything a run holds: data, policy (+ reference), optimizer, engine, weight sync, sinks."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.output_dir)
        self.info: ParallelInfo = init_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.trainer.seed)
        self.is_main = self.info.rank == 0
        self.feeds_engine = self.info.tp_rank == 0 and self.info.pp_rank == 0
        self.replica_src = dist.get_global_rank(model_parallel_group(), 0)
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=cfg.trainer.keep_last)
        self.inputs = setup.prepare_inputs(cfg, self.run_dir, self.info)
        self.tokenizer, self.hf_config = setup.load_tokenizer_and_config(self.inputs.model_dir)
        self.train_set = PromptDataset(self.inputs.train_files, self.tokenizer,
                                       max_prompt_length=cfg.data.max_prompt_length,
                                       skip_bad_rows=cfg.data.skip_bad_rows)
        self.val_set = (PromptDataset(self.inputs.val_files, self.tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                      skip_bad_rows=cfg.data.skip_bad_rows) if self.inputs.val_files else None)
        self.sampler = PromptSampler.from_config(len(self.train_set), cfg.data)
        self._check_batch_shape()
        self.policy = setup.build_policy(cfg, self.hf_config, self.inputs.model_dir, self.info)
        self.optimizer = build_optimizer(self.policy, cfg.optim)
        self.step_count = 0
        self.nonfinite_streak = 0
        self.engine = setup.build_engine(cfg, self.inputs.model_dir, self.info)
        self.fed_engine = self.engine if self.feeds_engine else None  # what the weight sync feeds here
        self.sync = setup.build_weight_sync(cfg, self.policy, self.hf_config)
        reference_dir = self._sft_warmup_or_resume()
        self._drop_records_after(self.step_count)
        self.reference = (setup.build_reference(cfg, self.hf_config, reference_dir, self.info)
                          if cfg.algorithm.kl_coef > 0 else None)
        self.sync.push(self.fed_engine)
        self.metrics = (MetricsWriter(self.run_dir, tensorboard=cfg.trainer.tensorboard,
                                      wandb_project=cfg.trainer.wandb_project,
                                      config=dataclasses.asdict(cfg)) if self.is_main else None)
        self.rollout_file = self.run_dir / ROLLOUTS_FILE

    # ------------------------------------------------------------------ the loop

    def fit(self) -> None:
        cfg = self.cfg.trainer
        progress = setup.progress_bar(cfg, self.step_count, enabled=self.is_main)
        if cfg.test_freq and self.step_count == 0:
            self._log(0, self.validate())
        while self.step_count < cfg.total_steps:
            step = self.step_count + 1
            start = time.perf_counter()
            metrics = self.step(step)
            self.step_count = step
            last = step == cfg.total_steps
            if cfg.test_freq and (step % cfg.test_freq == 0 or last):
                validating = time.perf_counter()
                metrics.update(self.validate())
                metrics["time/validate_s"] = time.perf_counter() - validating
            if (cfg.save_freq and step % cfg.save_freq == 0) or last:
                saving = time.perf_counter()
                self.save_checkpoint()
                metrics["time/checkpoint_s"] = time.perf_counter() - saving
            metrics["time/step_s"] = time.perf_counter() - start  # all of it: validation and checkpoint too
            self._log(step, metrics)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                 step_s=f"{metrics['time/step_s']:.1f}")
        progress.close()
        if cfg.export_hf and not cfg.rollout_only:
            self.export_hf(self.run_dir / "hf")
        if self.is_main:
            setup.finish(self.run_dir)

    def step(self, step: int) -> dict[str, float]:
        """One GRPO step; returns its metrics. Only rank 0 logs them, and it holds them all: the rollout
        metrics of its replica (the first) and the update's (reduced over every rank by train_step)."""
        timer = PhaseTimer()
        batch, rows_metrics = self.rollouts(step, timer)
        metrics: dict[str, float] = dict(rows_metrics)
        if not self.cfg.trainer.rollout_only:
            metrics.update(self.update(batch, timer))
            with timer("sync"):
                metrics.update({f"sync/{k}": v for k, v in self.sync.push(self.fed_engine).items()})
                if self.cfg.rollout.check_weights:
                    self.sync.check(self.fed_engine)
        metrics.update(timer.seconds)
        return metrics

    def rollouts(self, step: int, timer: PhaseTimer) -> tuple[RolloutBatch, dict[str, float]]:
        """This replica's rollouts of ``step`` (generated, or replayed from a file), with their rewards;
        the reward metrics only on the rank that generated them."""
        packed, metrics = None, {}
        if self.feeds_engine:
            packed, metrics = phases.generate_and_score(self, step, timer)
        packed = broadcast_batch(packed, src=self.replica_src, group=model_parallel_group())
        return packed, metrics

    def update(self, batch: RolloutBatch, timer: PhaseTimer) -> dict[str, float]:
        """Advantages, old/reference logprobs, then ppo_epochs x mini-batches of clipped updates."""
        alg, vocab = self.cfg.algorithm, self.hf_config.vocab_size
        advantages = ADVANTAGE_FUNCTIONS[alg.advantage](batch.rewards, batch.group_index)
        token_advantages = algorithms.broadcast_to_tokens(advantages, batch.response_mask)
        loss_mask = batch.response_mask & ~(batch.truncated.unsqueeze(-1) if alg.overlong_filter else False)
        micro = alg.micro_batch_size
        mini_batches = [self._mini_batches(len(batch), epoch) for epoch in range(alg.ppo_epochs)]
        on_policy = len(mini_batches) == 1 and len(mini_batches[0]) == 1  # one update: old policy == current
        temperature = self.cfg.rollout.temperature
        with timer("logprob"):
            old = None if on_policy else forward_logprobs(unwrap_ddp(self.policy), batch.input_ids, vocab_size=vocab,
                                                          temperature=temperature, micro_batch_size=micro).logprobs
            ref = (forward_logprobs(self.reference, batch.input_ids, vocab_size=vocab, temperature=temperature,
                                    micro_batch_size=micro).logprobs if self.reference is not None else None)
        settings = LossSettings(clip_low=alg.clip_low, clip_high=alg.clip_high, clip_c=alg.clip_c,
                                kl_coef=alg.kl_coef, kl_kind=alg.kl_kind, temperature=temperature,
                                entropy_coef=alg.entropy_coef, loss_agg=alg.loss_agg)
        sums: dict[str, float] = {}
        updates = 0
        with timer("update"):
            for epoch_batches in mini_batches:
                for rows in epoch_batches:
                    micro_batches = make_micro_batches(batch, rows, micro_batch_size=micro, loss_mask=loss_mask,
                                                       old_logprobs=old, advantages=token_advantages,
                                                       ref_logprobs=ref)
                    result = self._guarded_step(micro_batches, settings)
                    for key, value in result.items():
                        sums[key] = sums.get(key, 0.0) + value
                    updates += 1
        metrics = {f"actor/{k}": v / updates for k, v in sums.items() if k != "rollout_logprob_gap"}
        # trainer-vs-engine logprobs of the sampled tokens, before the update (same weights)
        metrics["rollout/logprob_gap_mean"] = (sums["rollout_logprob_gap"] if on_policy else
                                               float((old - batch.rollout_logprobs).abs()[batch.response_mask].mean()))
        return metrics

    def _guarded_step(self, micro_batches, settings: LossSettings) -> dict[str, float]:
        """One optimizer step; a non-finite loss or grad norm leaves the weights as they were
        (Megatron's optimizer skips such a step) and, after max_nonfinite_steps in a row, stops the run."""
        set_lr(self.optimizer, self.cfg.optim.lr_at(self.step_count + 1))
        result = train_step(self.policy, self.optimizer, micro_batches, vocab_size=self.hf_config.vocab_size,
                            global_num_tokens=count_valid_tokens(micro_batches),
                            global_num_seqs=count_valid_sequences(micro_batches), settings=settings)
        finite = math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"])
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        if not finite:
            log.warning("step %d: non-finite loss %s / grad norm %s; update skipped",
                        self.step_count + 1, result["loss"], result["grad_norm"])
            if self.nonfinite_streak >= self.cfg.trainer.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.nonfinite_streak} consecutive steps had a non-finite loss or grad norm "
                    f"(last: loss={result['loss']}, grad_norm={result['grad_norm']}); stopping. The last "
                    f"checkpoint in {self.checkpoints.root} holds finite weights")
        return result

    def _mini_batches(self, num_rows: int, epoch: int) -> list[torch.Tensor]:
        """Row indices of each mini-batch (whole prompt groups, shuffled per epoch when several)."""
        n = self.cfg.rollout.n
        per = (self.cfg.algorithm.mini_batch_size or num_rows // n) * n
        order = torch.arange(num_rows)
        if per < num_rows:
            generator = torch.Generator().manual_seed(self.cfg.trainer.seed * 100_003 + self.step_count * 101 + epoch)
            groups = torch.randperm(num_rows // n, generator=generator)
            order = (groups.unsqueeze(-1) * n + torch.arange(n)).flatten()
        return list(order.split(per))

    # ------------------------------------------------------------------ validation, checkpoints, export

    def validate(self) -> dict[str, float]:
        """Greedy answers to the validation prompts, scored: val/test_acc/<source>, val/test_score/<source>
        (computed and returned on rank 0 only, which logs them)."""
        metrics: dict[str, float] = {}
        if self.is_main and self.val_set is not None:
            metrics = phases.validate(self)
        return metrics

    def save_checkpoint(self) -> Path:
        from megatron_rl.checkpoint.distributed import save_checkpoint

        state = {"sampler": self.sampler.state_dict(), "nonfinite_streak": self.nonfinite_streak}
        return self.checkpoints.save(
            self.step_count, state,
            write_shards=lambda tmp: save_checkpoint(tmp, self.policy, self.optimizer, iteration=self.step_count),
            write_extra=lambda tmp: phases.write_checkpoint_metadata(tmp, self.cfg, self.inputs.model_dir))

    def export_hf(self, out_dir: Path) -> None:
        """The policy as a Hugging Face model directory (collective; rank 0 writes)."""
        phases.export_hf(self, out_dir)

    def _sft_warmup_or_resume(self) -> Path:
        """Resume from the newest good checkpoint, or run the SFT warm-up; return the reference's
        model directory (the model RL starts from)."""
        cfg = self.cfg.trainer
        self.checkpoints.remove_partial()
        if self.is_main:  # what a kill inside an atomic write left behind (tiny model, SFT model, hf/)
            remove_stale_temporaries(self.run_dir)
        reference_dir = phases.sft_model_dir(self.run_dir) if cfg.sft_warmup_steps else self.inputs.model_dir
        if cfg.resume == "auto":
            from megatron_rl.checkpoint.distributed import load_checkpoint

            found = self.checkpoints.load_latest(lambda path: load_checkpoint(path, self.policy, self.optimizer))
            if found is not None:
                self.step_count, state = found
                self.sampler.load_state_dict(state["sampler"])
                self.nonfinite_streak = state.get("nonfinite_streak", 0)
                if self.is_main:
                    print(f"resumed from {self.checkpoints.step_dir(self.step_count)} (step {self.step_count})",
                          flush=True)
                return reference_dir
        elif self.checkpoints.complete():
            raise ValueError(f"trainer.resume=never but {self.checkpoints.root} holds checkpoints; "
                             "use a new trainer.output_dir or trainer.resume=auto")
        if cfg.sft_warmup_steps and reference_dir.is_dir():  # warmed up before, then stopped before a checkpoint
            setup.load_weights(self.policy, self.optimizer, reference_dir, self.hf_config, self.info)
        elif cfg.sft_warmup_steps:
            phases.sft_warmup(self, reference_dir)
            setup.load_weights(self.policy, self.optimizer, reference_dir, self.hf_config, self.info)
        return reference_dir

    def _drop_records_after(self, step: int) -> None:
        """Drop what an interrupted attempt logged after ``step`` (the step this run starts from, 0 when
        no checkpoint was found): those steps run again, and their lines would otherwise appear twice."""
        if not self.is_main:
            return
        for path in (self.run_dir / METRICS_FILE, self.run_dir / ROLLOUTS_FILE):
            dropped = truncate_step_records(path, step)
            if dropped:
                print(f"{path}: {dropped} lines of steps after {step} dropped (an interrupted attempt's; "
                      "those steps run again)", flush=True)

    def _check_batch_shape(self) -> None:
        alg, data, n = self.cfg.algorithm, self.cfg.data, self.cfg.rollout.n
        dp = self.info.dp_size
        if data.batch_size % dp:
            raise ValueError(f"data.batch_size={data.batch_size} is not divisible by the data-parallel size {dp}")
        if alg.dynamic_sampling and dp > 1:
            raise ValueError(f"algorithm.dynamic_sampling needs one data-parallel replica (dp={dp}): replicas "
                             "would draw different numbers of prompts and their samplers would drift apart")
        local = data.batch_size // dp
        mini = alg.mini_batch_size or local
        if alg.mini_batch_size and local % alg.mini_batch_size:
            raise ValueError(f"algorithm.mini_batch_size={alg.mini_batch_size} does not divide the {local} "
                             "prompts each data-parallel rank gets per step")
        if (mini * n) % alg.micro_batch_size:
            raise ValueError(f"algorithm.micro_batch_size={alg.micro_batch_size} does not divide the {mini * n} "
                             f"sequences of a mini-batch ({mini} prompts x rollout.n={n})")

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.log(step, metrics)

    def close(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        destroy_parallel()

    def local_prompts(self, indices: list[int]) -> list[PromptExample]:
        """This data-parallel rank's share of a batch of dataset indices."""
        return [self.train_set[i] for i in indices[self.info.dp_rank :: self.info.dp_size]]

