"""Optimizer state and gradient buffers out of device memory between updates (megatron/offload.py).

On a CPU-only machine host and device memory are the same, so nothing is copied; what the CPU tests
check is the bookkeeping: which tensors move (Adam's state always; fp32 master weights only where the
model trains in bf16; never the model's own parameters), the bytes counted (by hand from the parameter
count), that the gradient buffers really are released and come back zeroed, and that training with
offload cycles between the steps is bitwise the training without them. The GPU test checks the move."""

from __future__ import annotations

import pytest
import torch
from _helpers import load_hf_state, train_batch
from transformers import AutoConfig

from megatron_rl.checkpoint.qwen2 import load_hf_into_model
from megatron_rl.megatron.model import build_gpt_model
from megatron_rl.megatron.offload import OptimizerOffload
from megatron_rl.megatron.optim import OptimizerSettings, build_optimizer, unwrap_ddp, wrap_ddp
from megatron_rl.megatron.train_step import LossSettings, MicroBatch, count_valid_tokens, train_step

# Megatron-core source the offload relies on (a megatron upgrade that moves it fails here, not in a run)
BUFFER_METHODS = ("offload_to_cpu", "reload_from_cpu")


def _policy(model_dir, *, distributed: bool = False, bf16: bool = False):
    """A DDP-wrapped tiny Qwen2 and its Megatron AdamW. ``bf16``: a bf16 model with fp32 master
    weights (Megatron's Float16Optimizer; it runs on the CPU too, only the trainer refuses bf16 there)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    hf = AutoConfig.from_pretrained(model_dir)
    model = build_gpt_model(hf, params_dtype=torch.bfloat16 if bf16 else torch.float32, layer_spec="local")
    load_hf_into_model(model, load_hf_state(model_dir), hf, tp_rank=0, tp_size=1)
    settings = OptimizerSettings(lr=1e-3, use_distributed_optimizer=distributed)
    ddp = wrap_ddp(model, settings)
    if bf16:
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True,
                                                           params_dtype=torch.bfloat16), [ddp])
    else:
        optimizer = build_optimizer(ddp, settings)
    return ddp, optimizer, hf.vocab_size


def _step(ddp, optimizer, vocab: int) -> dict:
    ids, mask, advantages = train_batch(vocab)
    micro = [MicroBatch(ids[r:r + 1], mask[r:r + 1], None, advantages[r:r + 1]) for r in range(len(ids))]
    return train_step(ddp, optimizer, micro, global_num_tokens=count_valid_tokens(micro), vocab_size=vocab,
                      settings=LossSettings(kl_coef=0.0, entropy_coef=0.01))


def _bytes_by_kind(offload: OptimizerOffload) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for item in offload.items():
        out[item.kind, item.name] = out.get((item.kind, item.name), 0) + item.num_bytes
    return out


def test_megatron_buffer_methods_exist() -> None:
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    for name in BUFFER_METHODS:
        assert callable(getattr(_ParamAndGradBuffer, name)), name


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed_optimizer"])
def test_fp32_moves_adam_state_and_grad_buffer_never_the_weights(qwen2_dirs, world1, distributed) -> None:
    """fp32: the optimizer steps the model's own parameters (the distributed optimizer: views of them),
    so no master weight moves; Adam's two moments (4 bytes per parameter each) and its step (one fp32
    scalar per parameter tensor) do, and the gradient buffer (4 bytes per parameter) is released."""
    ddp, optimizer, vocab = _policy(qwen2_dirs[True], distributed=distributed)
    params = list(unwrap_ddp(ddp).parameters())
    numel = sum(p.numel() for p in params)
    offload = OptimizerOffload(ddp, optimizer)
    assert _bytes_by_kind(offload) == {("grad_buffer", "float32"): 4 * numel}  # no Adam state before a step
    _step(ddp, optimizer, vocab)
    assert _bytes_by_kind(offload) == {("state", "exp_avg"): 4 * numel, ("state", "exp_avg_sq"): 4 * numel,
                                       ("state", "step"): 4 * len(params), ("grad_buffer", "float32"): 4 * numel}


def test_bf16_also_moves_the_fp32_master_weights(qwen2_dirs, world1) -> None:
    """bf16: the optimizer keeps fp32 master copies of the bf16 weights (moved); parameters the model
    keeps in fp32 itself (Megatron's torch RMSNorm weights) are stepped in place and stay."""
    ddp, optimizer, vocab = _policy(qwen2_dirs[True], bf16=True)
    params = list(unwrap_ddp(ddp).parameters())
    bf16_numel = sum(p.numel() for p in params if p.dtype == torch.bfloat16)
    numel = sum(p.numel() for p in params)
    assert 0 < bf16_numel < numel
    _step(ddp, optimizer, vocab)
    by_kind = _bytes_by_kind(OptimizerOffload(ddp, optimizer))
    assert by_kind[("master", "param")] == 4 * bf16_numel
    assert by_kind[("state", "exp_avg")] == by_kind[("state", "exp_avg_sq")] == 4 * numel


def test_to_host_releases_the_grad_buffer_and_to_device_brings_it_back_zeroed(qwen2_dirs, world1) -> None:
    ddp, optimizer, vocab = _policy(qwen2_dirs[True])
    numel = sum(p.numel() for p in unwrap_ddp(ddp).parameters())
    _step(ddp, optimizer, vocab)
    offload = OptimizerOffload(ddp, optimizer)
    state_before = {k: v.data_ptr() for s in optimizer.chained_optimizers[0].optimizer.state.values()
                    for k, v in s.items()}
    out = offload.to_host()
    assert out == {"optimizer_bytes": 8.0 * numel + 4 * len(list(ddp.parameters())), "grad_bytes": 4.0 * numel,
                   "copied_bytes": 0.0}  # host memory already: nothing copied on a CPU-only machine
    assert [b.grad_data.untyped_storage().size() for b in ddp.buffers] == [0] * len(ddp.buffers)
    assert offload.to_host() == {"optimizer_bytes": 0.0, "grad_bytes": 0.0, "copied_bytes": 0.0}  # already
    back = offload.to_device()
    assert back["grad_bytes"] == 4.0 * numel and back["copied_bytes"] == 0.0
    for buffer in ddp.buffers:
        assert buffer.grad_data.untyped_storage().nbytes() == 4 * buffer.numel
        assert not buffer.grad_data.any()
    for param in unwrap_ddp(ddp).parameters():  # the views into the buffer are valid again
        assert param.main_grad.shape == param.shape and not param.main_grad.any()
    state_after = {k: v.data_ptr() for s in optimizer.chained_optimizers[0].optimizer.state.values()
                   for k, v in s.items()}
    assert state_after == state_before  # the CPU state was not copied


@pytest.fixture
def deterministic():
    """On GPU, deterministic kernels (the embedding's backward adds atomically otherwise), so that two
    runs can be compared bit for bit; nothing to do on CPU."""
    if not torch.cuda.is_available():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_training_with_offload_cycles_is_bitwise_training_without(qwen2_dirs, world1, deterministic, bf16) -> None:
    """Three steps with offload -> onload around each (as the trainer does between updates) against
    three plain steps from the same start: same losses, weights and Adam state, bit for bit (on GPU
    the state really goes to host memory and back)."""
    runs = []
    for cycle in (False, True):
        ddp, optimizer, vocab = _policy(qwen2_dirs[True], bf16=bf16)
        offload = OptimizerOffload(ddp, optimizer) if cycle else None
        losses = []
        for _ in range(3):
            if offload is not None:
                offload.to_device()
            losses.append(_step(ddp, optimizer, vocab)["loss"])
            if offload is not None:
                offload.to_host()
        if offload is not None:
            offload.to_device()
        state = [v.clone() for s in optimizer.chained_optimizers[0].optimizer.state.values() for v in s.values()]
        runs.append((losses, [p.detach().clone() for p in unwrap_ddp(ddp).parameters()], state))
    (losses_a, params_a, state_a), (losses_b, params_b, state_b) = runs
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b, strict=True))
    assert not torch.equal(params_a[0], unwrap_ddp(_policy(qwen2_dirs[True], bf16=bf16)[0]).embedding.word_embeddings
                           .weight)  # the steps did change the weights


@pytest.mark.gpu
def test_offload_frees_device_memory_and_round_trips(qwen2_dirs, world1) -> None:
    ddp, optimizer, vocab = _policy(qwen2_dirs[True], bf16=True)
    _step(ddp, optimizer, vocab)
    offload = OptimizerOffload(ddp, optimizer)
    state = [v.clone() for s in optimizer.chained_optimizers[0].optimizer.state.values() for v in s.values()]
    allocated = torch.cuda.memory_allocated()
    out = offload.to_host()
    assert out["copied_bytes"] > 0
    assert allocated - torch.cuda.memory_allocated() >= out["copied_bytes"] + out["grad_bytes"] - (1 << 20)
    offload.to_device()
    after = [v for s in optimizer.chained_optimizers[0].optimizer.state.values() for v in s.values()]
    assert all(torch.equal(a, b) and a.device == b.device for a, b in zip(state, after, strict=True))
