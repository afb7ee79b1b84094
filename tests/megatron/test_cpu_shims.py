"""The CPU shims: each one's megatron target still has the code it patches, and each one works."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_rl.megatron import cpu

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are only applied without CUDA")


def source_of(module_name: str, name: str) -> str:
    """The source of top-level ``name`` in ``module_name``'s file, read from disk (so it is the
    original megatron code even after a shim replaced the attribute)."""
    path = Path(importlib.util.find_spec(module_name).origin)
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(text, node)
    raise AssertionError(f"{module_name}.{name} no longer exists: re-check the CPU shim that targets it")


@pytest.mark.parametrize(("module_name", "name", "pattern"), cpu.SHIM_TARGETS,
                         ids=[f"{m.rsplit('.', 1)[1]}.{n}:{p}" for m, n, p in cpu.SHIM_TARGETS])
def test_shim_target_still_has_the_patched_code(module_name, name, pattern) -> None:
    assert hasattr(importlib.import_module(module_name), name)
    assert pattern in source_of(module_name, name), (
        f"{module_name}.{name} no longer contains {pattern!r}: the CPU shim for it may be stale")


@pytest.fixture
def shims():
    assert cpu.apply_cpu_shims() is True
    return cpu


@needs_no_cuda
def test_apply_is_idempotent(shims) -> None:
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as tp_random

    before = (torch.cuda.current_device, tp_random.torch, tp_random._get_cuda_rng_state, schedules.torch,
              torch.Tensor.cuda, torch.cuda.synchronize)
    assert cpu.apply_cpu_shims() is True and cpu.cpu_shims_applied()
    after = (torch.cuda.current_device, tp_random.torch, tp_random._get_cuda_rng_state, schedules.torch,
             torch.Tensor.cuda, torch.cuda.synchronize)
    assert all(a is b for a, b in zip(before, after))


@needs_no_cuda
def test_current_device_is_cpu(shims) -> None:  # shim 1
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"


@needs_no_cuda
def test_rng_tracker_runs_on_the_cpu_generator(shims) -> None:  # shim 2
    from megatron.core import tensor_parallel

    def draw_in_fork() -> tuple[torch.Tensor, torch.Tensor]:
        tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
        torch.manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        return inside, torch.rand(3)

    inside_a, outside_a = draw_in_fork()
    inside_b, _outside_b = draw_in_fork()
    assert torch.equal(inside_a, inside_b)  # the tracker's state is seeded, reproducibly
    torch.manual_seed(7)
    assert torch.equal(outside_a, torch.rand(3))  # the default stream is restored after the fork
    assert not torch.equal(inside_a, outside_a)


@needs_no_cuda
def test_synchronize_is_a_no_op(shims) -> None:  # shim 3
    assert torch.cuda.synchronize() is None


@needs_no_cuda
def test_schedules_and_utils_allocate_cuda_requests_on_cpu(shims) -> None:  # shims 4 and 6
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.float32 is torch.float32  # everything else is torch's own
    mask = utils.get_default_causal_mask(3)
    assert mask.device.type == "cpu" and mask.tolist() == [[False, True, True], [False, False, True],
                                                           [False, False, False]]


@needs_no_cuda
def test_tensor_cuda_is_identity(shims) -> None:  # shim 5
    t = torch.ones(2)
    assert t.cuda() is t


@needs_no_cuda
def test_optimizer_modules_allocate_cuda_requests_on_cpu(shims) -> None:  # shim 6 (optimizer part)
    import importlib

    for module_name in cpu.CUDA_TO_CPU_MODULES:
        module = importlib.import_module(module_name)
        assert isinstance(module.torch, cpu.CudaToCpuTorch), module_name
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler

    assert ConstantGradScaler(1.0).scale.device.type == "cpu"  # built with device='cuda'


@needs_no_cuda
def test_tensor_type_reports_cuda_names_to_the_optimizer_only(shims) -> None:  # shim 7
    param = torch.nn.Parameter(torch.ones(2))
    assert param.type() == "torch.FloatTensor"  # everyone else sees the truth
    assert param.type(torch.float64).dtype == torch.float64  # conversions are untouched
    import types

    # A function whose globals (hence its caller module name) are the optimizer module's.
    probe = types.FunctionType((lambda t: t.type()).__code__, {"__name__": "megatron.core.optimizer.optimizer"})
    assert probe(param) == "torch.cuda.FloatTensor"
    assert probe(torch.ones(2, dtype=torch.bfloat16)) == "torch.cuda.BFloat16Tensor"
    assert probe(torch.ones(2, dtype=torch.long)) == "torch.LongTensor"


@pytest.mark.gpu
def test_no_shims_with_cuda() -> None:
    original = torch.cuda.current_device
    assert cpu.apply_cpu_shims() is False
    assert torch.cuda.current_device is original
