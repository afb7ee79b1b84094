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
import functools
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rl.checkpoint.hf_io import remove_stale_temporaries
from megatron_rl.config import Config
from megatron_rl.data.dataset import PromptDataset, PromptExample, PromptSampler, check_datasets
from megatron_rl.megatron.forward import forward_logprobs
from megatron_rl.megatron.offload import OptimizerOffload
from megatron_rl.megatron.optim import build_optimizer, set_lr, unwrap_ddp
from megatron_rl.megatron.parallel import (
    ParallelInfo,
    data_parallel_group,
    destroy_parallel,
    init_parallel,
    local_world_env,
    model_parallel_group,
)
from megatron_rl.megatron.train_step import LossSettings, count_valid_sequences, count_valid_tokens, train_step
from megatron_rl.trainer import phases, setup
from megatron_rl.trainer.advantage import step_advantages
from megatron_rl.trainer.batch import RolloutBatch, broadcast_batch, make_micro_batches
from megatron_rl.trainer.checkpoint import CheckpointManager
from megatron_rl.trainer.colocation import Colocation, resolve_offload
from megatron_rl.trainer.critic import Critic, uses_critic
from megatron_rl.trainer.device import choose_device
from megatron_rl.trainer.metrics import (
    GENERATIONS_FILE,
    METRICS_FILE,
    ROLLOUTS_FILE,
    MetricsWriter,
    PhaseTimer,
    truncate_step_records,
)

__all__ = ["Trainer", "train"]

log = logging.getLogger(__name__)

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
        bf16 = cfg.optim.bf16 or (uses_critic(cfg) and cfg.critic.optim.bf16)
        self.device = choose_device(cfg.trainer.device, bf16=bf16)  # before anything touches CUDA
        if os.environ.get("RANK", "0") == "0":
            print(self.device.line(), flush=True)
        self.info: ParallelInfo = init_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.trainer.seed)
        self.is_main = self.info.rank == 0
        self.feeds_engine = self.info.tp_rank == 0 and self.info.pp_rank == 0
        self.replica_src = dist.get_global_rank(model_parallel_group(), 0)
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=cfg.trainer.keep_last)
        self.inputs = setup.prepare_inputs(cfg, self.run_dir, self.info)
        self.tokenizer, self.hf_config = setup.load_tokenizer_and_config(self.inputs.model_dir)
        self.memory_plan = setup.check_memory(cfg, self.hf_config, self.info)  # before any model is built
        self.train_set = PromptDataset(self.inputs.train_files, self.tokenizer,
                                       max_prompt_length=cfg.data.max_prompt_length,
                                       skip_bad_rows=cfg.data.skip_bad_rows, prompt_template=cfg.data.prompt_template)
        self.val_set = (PromptDataset(self.inputs.val_files, self.tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                      skip_bad_rows=cfg.data.skip_bad_rows, prompt_template=cfg.data.prompt_template)
                        if self.inputs.val_files else None)
        check_datasets(self.train_set, self.val_set, cfg.data, report=self.is_main)  # kept / dropped per file
        self.sampler = PromptSampler.from_config(len(self.train_set), cfg.data)
        self._check_batch_shape()
        self.policy = setup.build_policy(cfg, self.hf_config, self.inputs.model_dir, self.info)
        self.optimizer = build_optimizer(self.policy, cfg.optim)
        # PPO with a critic: the value model (same layout, trunk from the same weights, a value head)
        self.critic = Critic(cfg, self.hf_config, self.inputs.model_dir, self.info) if uses_critic(cfg) else None
        self.kl_controller = cfg.algorithm.make_kl_controller() if cfg.algorithm.kl_in_reward else None
        self.step_count = 0
        self.nonfinite_streak = 0
        self.engine = setup.build_engine(cfg, self.inputs.model_dir, self.info)  # None where nothing generates
        self.fed_engine = self.engine if self.feeds_engine else None  # what the weight sync feeds here
        # colocated: the engine sleeps until the first push (trainer/colocation.py has the order)
        self.colocation = Colocation(self.fed_engine, sleeps=cfg.rollout.mode == "colocated")
        self.colocation.sleep_engine()
        self.sync = setup.build_weight_sync(cfg, self.policy, self.hf_config)
        reference_dir = self._sft_warmup_or_resume()
        self._drop_records_after(self.step_count)
        self.reference = (setup.build_reference(cfg, self.hf_config, reference_dir, self.info)
                          if cfg.algorithm.kl_coef > 0 or cfg.algorithm.kl_in_reward else None)
        self.colocation.add_reference(self.reference, offload=resolve_offload(
            "memory.offload_reference", cfg.memory.offload_reference, auto=self.device.device == "cuda"))
        if setup.offload_optimizer(cfg, self.memory_plan):
            self.colocation.add_optimizer_offload(OptimizerOffload(self.policy, self.optimizer))
            if self.critic is not None:
                self.critic.offload_optimizer()
        self.colocation.push_weights(self.sync)
        self.metrics = (MetricsWriter(self.run_dir, tensorboard=cfg.trainer.tensorboard,
                                      wandb_project=cfg.trainer.wandb_project,
                                      config=dataclasses.asdict(cfg)) if self.is_main else None)
        self.rollout_file = self.run_dir / ROLLOUTS_FILE

    # ------------------------------------------------------------------ the loop

    def fit(self) -> None:
        cfg = self.cfg.trainer
        total = self.total_steps()
        if self.is_main:
            print(self._run_length(total), flush=True)
        progress = setup.progress_bar(cfg, self.step_count, total=total, enabled=self.is_main)
        if cfg.test_freq and cfg.val_before_train and self.step_count == 0:
            self._log(0, self.validate())
        while self.step_count < total:
            step = self.step_count + 1
            start = time.perf_counter()
            metrics = self.step(step)
            self.step_count = step
            last = step == total
            if cfg.test_freq and (step % cfg.test_freq == 0 or last):
                validating = time.perf_counter()
                metrics.update(self.validate())
                metrics["time/validate_s"] = time.perf_counter() - validating
            if (cfg.save_freq and step % cfg.save_freq == 0) or last:
                # The step's line is appended once the checkpoint is written and synced, just before
                # the rename that makes it count: a kill before the rename loses both (the resume
                # drops the line and runs the step again), a kill after it keeps both.
                self.save_checkpoint(before_rename=functools.partial(self._log_step, step, metrics, start,
                                                                     time.perf_counter()))
            else:
                self._log_step(step, metrics, start)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                 step_s=f"{metrics.get('time/step_s', float('nan')):.1f}")
        progress.close()
        if cfg.export_hf and not cfg.rollout_only:
            self.export_hf(self.run_dir / "hf")
        if self.is_main:
            setup.finish(self.run_dir)

    def total_steps(self) -> int:
        """Steps of the run: ``trainer.total_epochs`` x the batches of an epoch, or ``trainer.total_steps``."""
        cfg = self.cfg.trainer
        return cfg.total_epochs * len(self.sampler) if cfg.total_epochs else cfg.total_steps

    def _run_length(self, total: int) -> str:
        """What the run's length is made of, printed at start."""
        prompts, batch = len(self.train_set), self.cfg.data.batch_size
        epoch = (f"{len(self.sampler)} batches of {batch} prompts per epoch: {prompts} training prompts, "
                 f"{prompts % batch if self.cfg.data.drop_last else 0} left out of each epoch by data.drop_last")
        steps = f"{total} step" + ("" if total == 1 else "s")
        if self.cfg.trainer.total_epochs:
            return f"run length: {steps} (trainer.total_epochs={self.cfg.trainer.total_epochs} x {epoch})"
        return f"run length: {steps} (trainer.total_steps; {epoch})"

    def _log_step(self, step: int, metrics: dict[str, float], started: float, saving: float | None = None) -> None:
        """Append step ``step``'s line; ``time/step_s`` runs from ``started`` (validation and checkpoint
        included) to now, ``time/checkpoint_s`` from ``saving`` (the checkpoint's start) to now."""
        now = time.perf_counter()
        if saving is not None:
            metrics["time/checkpoint_s"] = now - saving
        metrics["time/step_s"] = now - started
        self._log(step, metrics)

    def step(self, step: int) -> dict[str, float]:
        """One GRPO step; returns its metrics. Only rank 0 logs them, and it holds them all: the rollout
        metrics of its replica (the first) and the update's (reduced over every rank by train_step)."""
        timer = PhaseTimer()
        batch, rows_metrics = self.rollouts(step, timer)
        metrics: dict[str, float] = dict(rows_metrics)
        if not self.cfg.trainer.rollout_only:
            self.colocation.sleep_engine()  # the update needs the memory; wakes in push_weights
            metrics.update(self.update(batch, timer))
            with timer("sync"):
                pushed = self.colocation.push_weights(self.sync, check=self.cfg.rollout.check_weights)
                metrics.update({f"sync/{k}": v for k, v in pushed.items()})
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
        """Old/reference logprobs (and the critic's values), advantages, then ppo_epochs x mini-batches of
        updates: the critic's (if any), then the policy's (after critic.warmup_steps)."""
        alg, vocab = self.cfg.algorithm, self.hf_config.vocab_size
        loss_mask = batch.response_mask & ~(batch.truncated.unsqueeze(-1) if alg.overlong_filter else False)
        micro = alg.micro_batch_size
        mini_batches = [self._mini_batches(len(batch), epoch) for epoch in range(alg.ppo_epochs)]
        on_policy = len(mini_batches) == 1 and len(mini_batches[0]) == 1  # one update: old policy == current
        temperature = self.cfg.rollout.temperature
        passes = {"vocab_size": vocab, "temperature": temperature, "micro_batch_size": micro,  # response tokens only
                  "max_tokens_per_micro_batch": alg.max_tokens_per_micro_batch, "mask": batch.response_mask,
                  "chunk_size": alg.logprob_chunk_size}
        # On-policy, the update measures the trainer-vs-engine gap on the tokens of its loss; with none left
        # (every response cut and algorithm.overlong_filter) it would report 0.0, so the policy's logprobs
        # of the sampled tokens are taken here instead, as for off-policy updates.
        gap_in_update = on_policy and bool(loss_mask.any()) and not alg.kl_in_reward  # KL in reward: old needed
        with timer("logprob"):
            old = (None if gap_in_update else
                   forward_logprobs(unwrap_ddp(self.policy), batch.input_ids, **passes).logprobs)
            with self.colocation.reference_on_device() as reference:  # on the device for its forward only
                ref = (forward_logprobs(reference, batch.input_ids, **passes).logprobs
                       if reference is not None else None)
        with timer("critic"):
            values = self.critic.values(batch) if self.critic is not None else None
        advantage = step_advantages(alg, batch, values=values, old_logprobs=old, ref_logprobs=ref,
                                    kl_controller=self.kl_controller, dp_group=data_parallel_group())
        token_advantages = advantage.token_advantages
        metrics = dict(advantage.metrics)
        if self.critic is not None:
            with timer("critic"):
                metrics.update(self.critic.train(batch, mini_batches, loss_mask=loss_mask, old_values=values,
                                                 returns=advantage.returns, step=self.step_count + 1))
            if self.step_count < self.cfg.critic.warmup_steps:  # value pre-training: the policy waits
                return metrics
        settings = LossSettings(policy_loss=alg.policy_loss, policy_loss_params=alg.policy_loss_params(),
                                clip_low=alg.clip_low, clip_high=alg.clip_high, clip_c=alg.clip_c,
                                kl_coef=alg.kl_coef, kl_kind=alg.kl_kind, temperature=temperature,
                                entropy_coef=alg.entropy_coef, loss_agg=alg.loss_agg,
                                loss_agg_constant=batch.input_ids.shape[1] - 1,
                                logprob_chunk_size=alg.logprob_chunk_size)
        sums: dict[str, float] = {}
        updates = 0
        with timer("offload"):  # optimizer state and gradient buffers back on the device (if offloaded)
            self.colocation.optimizer_to_device()
        with timer("update"):
            for epoch_batches in mini_batches:
                for rows in epoch_batches:
                    micro_batches = make_micro_batches(batch, rows, micro_batch_size=micro, loss_mask=loss_mask,
                                                       old_logprobs=old, advantages=token_advantages,
                                                       ref_logprobs=ref,
                                                       max_tokens_per_micro_batch=alg.max_tokens_per_micro_batch)
                    # clip_cov's random tokens: one seed per update, the same when a resumed run redoes it
                    seed = self.cfg.trainer.seed * 1_000_003 + (self.step_count + 1) * 1_009 + updates
                    result = self._guarded_step(micro_batches, dataclasses.replace(settings, loss_seed=seed))
                    for key, value in result.items():
                        sums[key] = sums.get(key, 0.0) + value
                    updates += 1
        with timer("offload"):  # to host memory while the engine has the device (if offloaded)
            self.colocation.optimizer_to_host()
        metrics.update({f"actor/{k}": v / updates for k, v in sums.items() if k != "rollout_logprob_gap"})
        # trainer-vs-engine logprobs of the sampled tokens, before the update (same weights)
        metrics["rollout/logprob_gap_mean"] = (sums["rollout_logprob_gap"] if gap_in_update else
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
        """``rollout.val_n`` answers to each validation prompt at ``rollout.val_temperature``, scored:
        val/test_acc/<source>, val/test_score/<source> (means over every answer) and, with val_n > 1,
        val/pass@k/<source> (computed and returned on rank 0 only, which logs them)."""
        metrics: dict[str, float] = {}
        if self.is_main and self.val_set is not None:
            metrics = phases.validate(self)
        return metrics

    def save_checkpoint(self, before_rename=None) -> Path:
        """Checkpoint the current step; ``before_rename()`` runs on rank 0 once it is written, just
        before it counts (:meth:`CheckpointManager.save`)."""
        from megatron_rl.checkpoint.distributed import save_checkpoint

        state = {"sampler": self.sampler.state_dict(), "nonfinite_streak": self.nonfinite_streak}
        if self.kl_controller is not None:
            state["kl_controller"] = self.kl_controller.state_dict()

        def write_shards(tmp: Path) -> None:  # the policy, then the critic in tmp/critic
            save_checkpoint(tmp, self.policy, self.optimizer, iteration=self.step_count)
            if self.critic is not None:
                self.critic.save(tmp)

        return self.checkpoints.save(
            self.step_count, state,
            write_shards=write_shards,
            write_extra=lambda tmp: phases.write_checkpoint_metadata(tmp, self.cfg, self.inputs.model_dir),
            before_rename=before_rename)

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

            def load_shards(path: Path) -> None:
                load_checkpoint(path, self.policy, self.optimizer)
                if self.critic is not None:
                    self.critic.load(path)

            if self.critic is not None:
                self.critic.check_resumable(self.checkpoints)
            found = self.checkpoints.load_latest(load_shards)
            if found is not None:
                self.step_count, state = found
                self.sampler.load_state_dict(state["sampler"])
                self.nonfinite_streak = state.get("nonfinite_streak", 0)
                if self.kl_controller is not None and "kl_controller" in state:
                    self.kl_controller.load_state_dict(state["kl_controller"])
                if self.is_main:
                    print(f"resumed from {self.checkpoints.step_dir(self.step_count)} (step {self.step_count})",
                          flush=True)
                return reference_dir
        elif self.checkpoints.complete():
            raise ValueError(f"trainer.resume=never but {self.checkpoints.root} holds checkpoints; "
                             "use a new trainer.output_dir or trainer.resume=auto")
        if cfg.sft_warmup_steps and not reference_dir.is_dir():
            phases.sft_warmup(self, reference_dir)
        if cfg.sft_warmup_steps:  # (warmed up now, or before a stop that came before the first checkpoint)
            setup.load_weights(self.policy, self.optimizer, reference_dir, self.hf_config, self.info)
            if self.critic is not None:  # the critic's trunk starts where RL starts, as the reference
                self.critic.load_hf(reference_dir)
        return reference_dir

    def _drop_records_after(self, step: int) -> None:
        """Keep the metrics and rollout lines of the steps the checkpoint this run starts from covers
        (``step``; every line of a step <= ``step`` was on disk before that checkpoint was renamed into
        place) and drop the rest: those steps run again, and their lines would otherwise appear twice.
        With no checkpoint (``step`` 0) every line goes, the step-0 validation line included."""
        if not self.is_main:
            return
        for path in (self.run_dir / METRICS_FILE, self.run_dir / ROLLOUTS_FILE, self.run_dir / GENERATIONS_FILE):
            dropped = truncate_step_records(path, step if step > 0 else -1)
            if dropped:
                after = f"steps after {step}" if step > 0 else "an attempt that saved no checkpoint"
                print(f"{path}: {dropped} lines of {after} dropped (an interrupted attempt's; "
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
        if not alg.max_tokens_per_micro_batch and (mini * n) % alg.micro_batch_size:  # a token budget packs any count
            raise ValueError(f"algorithm.micro_batch_size={alg.micro_batch_size} does not divide the {mini * n} "
                             f"sequences of a mini-batch ({mini} prompts x rollout.n={n})")
        critic = self.cfg.critic
        if uses_critic(self.cfg) and not critic.max_tokens_per_micro_batch and (mini * n) % critic.micro_batch_size:
            raise ValueError(f"critic.micro_batch_size={critic.micro_batch_size} does not divide the {mini * n} "
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
        else:  # a rank that never generates: vLLM's process groups without an engine (setup.build_engine)
            from megatron_rl.rollout.vllm_engine import close_process_groups

            close_process_groups()
        destroy_parallel()

    def local_prompts(self, indices: list[int]) -> list[PromptExample]:
        """This data-parallel rank's share of a batch of dataset indices."""
        return [self.train_set[i] for i in indices[self.info.dp_rank :: self.info.dp_size]]

