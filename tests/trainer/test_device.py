"""``trainer.device`` (trainer/device.py): which device a run trains on, said first; a GPU run whose CUDA
is broken stops instead of becoming a CPU run; bf16 on the CPU is refused at run start (recipes with
bf16 still load). CUDA's answers are faked where the test needs a GPU host."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from megatron_rl.config import load_config
from megatron_rl.trainer import device as device_module
from megatron_rl.trainer.device import DeviceChoice, choose_device, cuda_problem

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cpu_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")


@pytest.fixture
def broken_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA build of torch whose driver is too old: is_available() warns and says False."""
    def is_available() -> bool:
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12040).")
        return False

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu130")
    monkeypatch.setattr(torch.cuda, "is_available", is_available)


def test_auto_on_a_cpu_build_chooses_the_cpu_and_says_why(cpu_torch) -> None:
    choice = choose_device("auto", bf16=False)
    assert choice == DeviceChoice("cpu", "trainer.device=auto: torch 2.13.0+cpu is a CPU build, without CUDA")
    assert choice.line() == "device: cpu (trainer.device=auto: torch 2.13.0+cpu is a CPU build, without CUDA)"


def test_cuda_without_a_working_gpu_stops_with_the_reason(cpu_torch) -> None:
    with pytest.raises(RuntimeError, match=r"trainer.device=cuda, but CUDA does not work here: torch 2\.13\.0\+cpu "
                                           r"is a CPU build.*set trainer.device=cpu"):
        choose_device("cuda", bf16=False)


def test_auto_on_a_gpu_host_with_broken_cuda_refuses_the_silent_cpu_fallback(broken_cuda, monkeypatch) -> None:
    monkeypatch.setattr(device_module, "nvidia_device_present", lambda: "/dev/nvidia0")
    with pytest.raises(RuntimeError, match=r"this host has an NVIDIA GPU \(/dev/nvidia0\).*driver on your system "
                                           r"is too old.*Refusing to fall back to the CPU"):
        choose_device("auto", bf16=False)
    with pytest.raises(RuntimeError, match="trainer.device=cuda, but CUDA does not work here: .*too old"):
        choose_device("cuda", bf16=False)


def test_auto_with_a_cuda_build_but_no_nvidia_device_uses_the_cpu(broken_cuda, monkeypatch) -> None:
    monkeypatch.setattr(device_module, "nvidia_device_present", lambda: None)
    choice = choose_device("auto", bf16=False)
    assert choice.device == "cpu" and "finds no usable CUDA device" in choice.reason


def test_cuda_that_works_is_this_ranks_device(monkeypatch) -> None:
    monkeypatch.setattr(device_module, "cuda_problem", lambda local_rank: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert choose_device("cuda", bf16=True) == DeviceChoice("cuda", "trainer.device=cuda: cuda:2 of 4")


def test_a_local_rank_beyond_the_visible_devices_is_named(monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cuda_problem(3) == "LOCAL_RANK=3 but only 2 CUDA device(s) are visible"


def test_cpu_hides_the_gpus_from_this_process(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: os.environ["CUDA_VISIBLE_DEVICES"] != "")
    assert choose_device("cpu", bf16=False) == DeviceChoice("cpu", "trainer.device=cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_cpu_after_cuda_started_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the driver kept the devices it had seen
    with pytest.raises(RuntimeError, match="CUDA was already started in this process"):
        choose_device("cpu", bf16=False)


@pytest.mark.parametrize("requested", ["auto", "cpu"])
def test_bf16_on_the_cpu_is_an_error_naming_the_field(cpu_torch, monkeypatch, requested) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match=r"optim.bf16=true needs CUDA, but this run trains on the CPU.*"
                                         r"set optim.bf16=false"):
        choose_device(requested, bf16=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU host trains bf16")
def test_a_bf16_recipe_loads_on_cpu_but_its_run_stops_first(tmp_path) -> None:
    """The 3B recipe (bf16) loads here (tests read it); its run stops before making anything."""
    cfg = load_config(REPO / "examples" / "medu1_qwen2.5_3b.yaml", [f"trainer.output_dir={tmp_path / 'run'}",
                                                                       "model.path=/nonexistent"])
    assert cfg.optim.bf16
    from megatron_rl.trainer.loop import Trainer

    with pytest.raises(ValueError, match="optim.bf16=true needs CUDA"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_device_field_is_checked_and_the_old_optimizer_knob_is_unknown() -> None:
    with pytest.raises(ValueError, match=r"trainer.device='gpu'.*'auto', 'cuda', 'cpu'"):
        load_config(None, ["trainer.device=gpu"])
    assert load_config(None, ["trainer.device=cuda"]).trainer.device == "cuda"  # checked at run start only
    with pytest.raises(ValueError, match=r"unknown config key 'parallel.use_distributed_optimizer'; "
                                         r"parallel accepts: pp, tp"):
        load_config(None, ["parallel.use_distributed_optimizer=true"])
    assert load_config(None, ["optim.use_distributed_optimizer=true"]).optim.use_distributed_optimizer
