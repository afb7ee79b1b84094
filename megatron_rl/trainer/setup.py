"""Building what a run needs: inputs (model dir, task files), policy, reference, engine, weight sync."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from megatron_rl.checkpoint.hf_io import atomic_dir
from megatron_rl.config import Config, to_yaml
from megatron_rl.data.builtin import make_tasks, task_files
from megatron_rl.megatron.optim import wrap_ddp
from megatron_rl.megatron.parallel import ParallelInfo, barrier
from megatron_rl.models import resolve_model_path
from megatron_rl.trainer.config import TINY_MODEL

__all__ = ["RunInputs", "build_engine", "build_policy", "build_reference", "check_memory", "offload_optimizer",
           "prepare_inputs"]


@dataclasses.dataclass(frozen=True)
class RunInputs:
    model_dir: Path
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def prepare_inputs(cfg: Config, run_dir: Path, info: ParallelInfo) -> RunInputs:
    """Rank 0 creates the run directory, the tiny model and the built-in tasks when the config asks
    for them (each written whole, then renamed into place; reused when present) and the resolved
    config.yaml; the other ranks wait for it."""
    # a known model's name (docs/models.md) is fetched into the cache once per node (its first local rank)
    model_dir = (run_dir / "tiny_model" if cfg.model.path == TINY_MODEL else
                 resolve_model_path(cfg.model.path, fetch=os.environ.get("LOCAL_RANK", "0") == "0"))
    tasks_dir = run_dir / "tasks"
    difficulty = cfg.data.builtin_tasks
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if cfg.model.path == TINY_MODEL and not model_dir.is_dir():
            from megatron_rl.testing import tiny_model

            with atomic_dir(model_dir) as tmp:
                tiny_model(tmp, seed=cfg.model.tiny_seed, num_hidden_layers=cfg.model.tiny_layers)
        if difficulty and not tasks_dir.is_dir():
            with atomic_dir(tasks_dir) as tmp:
                make_tasks(tmp, num_train=cfg.data.builtin_num_train, num_test=cfg.data.builtin_num_test,
                           seed=cfg.data.seed, difficulty=difficulty)
    barrier()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model.path={str(model_dir)!r} is not a Hugging Face model directory (no config.json)")
    if difficulty:
        files = task_files(tasks_dir, difficulty)
        return RunInputs(model_dir, (str(files["train"]),), (str(files["test"]),))
    if not cfg.data.train_files:
        raise ValueError("data.train_files is empty; name parquet files or set data.builtin_tasks=easy")
    return RunInputs(model_dir, cfg.data.train_files, cfg.data.val_files)


def load_tokenizer_and_config(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    return (AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False),
            AutoConfig.from_pretrained(model_dir, trust_remote_code=False))


def check_memory(cfg: Config, hf_config: Any, info: ParallelInfo) -> Any | None:
    """The run's memory plan against this device (:func:`megatron_rl.memory.check_run_fits`), before any
    model is built. With ``memory.check`` a run that cannot fit is refused here
    (``InsufficientMemoryError``: the plan's refusal, naming the largest items and the settings that
    would shrink them). With ``memory.check=false`` the plan is still made when
    ``memory.offload_optimizer=auto`` needs it (never refusing), else None."""
    if not cfg.memory.check and cfg.memory.offload_optimizer != "auto":
        return None
    from megatron_rl.memory import check_run_fits

    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun: ranks sharing this host
    return check_run_fits(cfg, hf_config, world_size=info.world_size, local_world_size=local_world_size)


def offload_optimizer(cfg: Config, plan: Any | None) -> bool:
    """``memory.offload_optimizer`` resolved: 'on' / 'off' as set; 'auto' as the memory plan decided
    (``plan.offload_optimizer``: on only when the run does not fit without it; off without a plan)."""
    from megatron_rl.trainer.colocation import resolve_offload

    planned = bool(getattr(plan, "offload_optimizer", False))
    return resolve_offload("memory.offload_optimizer", cfg.memory.offload_optimizer, auto=planned)


def _build_stage(cfg: Config, hf_config: Any, model_dir: Path, info: ParallelInfo) -> torch.nn.Module:
    """This rank's GPTModel stage holding ``model_dir``'s weights."""
    from megatron_rl.megatron.model import build_gpt_model, recompute_overrides

    dtype = torch.bfloat16 if cfg.optim.uses_bf16 else torch.float32
    recompute = recompute_overrides(cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers,
                                    num_layers_per_stage=hf_config.num_hidden_layers // info.pp_size)
    model = build_gpt_model(hf_config, params_dtype=dtype, tp_size=info.tp_size, pp_size=info.pp_size,
                            pre_process=info.pp_rank == 0, post_process=info.pp_rank == info.pp_size - 1,
                            layer_spec=cfg.model.layer_spec, **recompute)
    _load_hf(model, model_dir, hf_config, info)
    return model


def _load_hf(model: torch.nn.Module, model_dir: Path, hf_config: Any, info: ParallelInfo) -> None:
    """Copy this rank's shard of ``model_dir``'s weights (one file or an indexed set) into ``model``."""
    from megatron_rl.checkpoint.hf_io import SafetensorsSource
    from megatron_rl.checkpoint.qwen2 import load_hf_into_model

    source = SafetensorsSource(model_dir)
    state = {name: source.read(name) for name in source.names()}
    load_hf_into_model(model, state, hf_config, tp_rank=info.tp_rank, tp_size=info.tp_size, pp_rank=info.pp_rank,
                       pp_size=info.pp_size)


def load_weights(policy: torch.nn.Module, optimizer: Any, model_dir: Path, hf_config: Any, info: ParallelInfo) -> None:
    """Copy ``model_dir``'s weights into the policy in place and into the optimizer's fp32 master
    copies (bf16 training keeps those apart from the model's parameters)."""
    from megatron_rl.megatron.optim import unwrap_ddp

    _load_hf(unwrap_ddp(policy), model_dir, hf_config, info)
    reload = getattr(optimizer, "reload_model_params", None)
    if reload is not None:
        reload()


def build_policy(cfg: Config, hf_config: Any, model_dir: Path, info: ParallelInfo) -> torch.nn.Module:
    """The trainable policy stage, wrapped in Megatron's DDP."""
    return wrap_ddp(_build_stage(cfg, hf_config, model_dir, info), cfg.optim)


def build_reference(cfg: Config, hf_config: Any, model_dir: Path, info: ParallelInfo) -> torch.nn.Module:
    """The frozen reference (the model RL starts from), same layout as the policy."""
    from megatron_rl.megatron.reference import freeze_reference

    return freeze_reference(_build_stage(cfg, hf_config, model_dir, info))


def build_engine(cfg: Config, model_dir: Path, info: ParallelInfo | None):
    """This rank's rollout engine (vLLM by default), or None: only the first rank of each model replica
    (tp_rank 0, pp_rank 0) generates, so only it holds an engine. Colocated, that engine runs in this
    process on this rank's device; separate, it is an engine actor (Ray) this rank connects to.
    ``info=None``: a process of the engine's own (an engine actor), outside any trainer world.

    A colocated vLLM engine creates its process groups collectively over the trainer's world, so every
    rank first creates them together (:func:`~megatron_rl.rollout.vllm_engine.init_process_groups`);
    the ranks that never generate then build nothing (no weights, no KV cache, no start-up profile run:
    a full engine there held several GB of host memory for nothing)."""
    feeds = info is None or (info.tp_rank == 0 and info.pp_rank == 0)
    if cfg.rollout.mode == "separate":
        if not feeds:
            return None
        from megatron_rl.cluster.engine import connect_engine

        return connect_engine(cfg, model_dir)
    max_len = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    if cfg.rollout.backend == "hf":
        from megatron_rl.rollout.hf_engine import TransformersEngine

        return TransformersEngine(model_dir) if feeds else None
    from megatron_rl.rollout.vllm_engine import VLLMEngine, init_process_groups

    if info is not None:
        init_process_groups()  # collective: every rank, before any engine starts
    if not feeds:
        return None
    # vLLM logs two lines per weight push (and benign per-push warnings on CPU) through the progress
    # bar; the trainer reports what matters in its metrics. VLLM_LOGGING_LEVEL=INFO brings them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    kv_bytes = None if torch.cuda.is_available() else int(cfg.rollout.kv_cache_gib * (1 << 30))
    return VLLMEngine(model_dir, max_model_len=max_len, kv_cache_memory_bytes=kv_bytes, seed=cfg.trainer.seed,
                      gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                      enable_sleep_mode=cfg.rollout.enable_sleep_mode, cpu_gemm=cfg.rollout.cpu_gemm,
                      cpu_threads=cfg.rollout.cpu_threads or None)


def build_weight_sync(cfg: Config, policy: torch.nn.Module, hf_config: Any):
    from megatron_rl.weight_sync import WeightSync

    # the engine's dtype: VLLMEngine computes in bf16 on GPU and fp32 on CPU
    return WeightSync(policy, hf_config, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def progress_bar(cfg, initial: int, *, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step",
                disable=not (enabled and cfg.progress_bar), dynamic_ncols=True)


def finish(run_dir: Path) -> None:
    """Write the reward plot and say where everything is."""
    from megatron_rl.trainer.plot import plot_run

    png = plot_run(run_dir)
    generations = run_dir / "generations.jsonl"
    print(f"metrics: {run_dir / 'metrics.jsonl'}\nplot:    {png}\n"
          + (f"responses: {generations} (a few per step)\n" if generations.is_file() else "")
          + f"hf:      {run_dir / 'hf' if (run_dir / 'hf').is_dir() else '(not exported)'}\n"
          f"checkpoints: {run_dir / 'checkpoints'}", flush=True)
