"""RemoteEngine's plumbing: tensors through the object store, timeouts and dead actors as clear errors."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from ray import cloudpickle

from megatron_rl.cluster.engine import RemoteEngine, pack_tensors, unpack_tensors
from megatron_rl.rollout.base import SamplingConfig


def test_pack_round_trip_is_bitwise_for_every_dtype() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [(f"t.{dtype}", torch.randn(3, 5, generator=generator).to(dtype))
               for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    tensors.append(("strided", torch.randn(4, 6, generator=generator).t()))  # not contiguous
    back = unpack_tensors(pack_tensors(tensors))
    assert [n for n, _ in back] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(tensors, back, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32),
                           b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32))


def test_pack_shares_memory_with_contiguous_cpu_tensors() -> None:
    tensor = torch.arange(6, dtype=torch.float32)
    (_, _, array), = pack_tensors([("x", tensor)])
    tensor[0] = 42.0
    assert array[0] == 42.0


class SlowEngine:
    """Stand-in engine actor: generate sleeps (a hung engine), load_weights records the tensors' sums."""

    def node_ip(self) -> str:
        return "10.1.2.3"

    def generate(self, prompt_token_ids, sampling):
        time.sleep(30)

    def load_weights(self, packed) -> list[float]:
        self.sums = [float(t.double().sum()) for _, t in unpack_tensors(packed)]

    def weight_sums(self) -> list[float]:
        return self.sums

    def close(self) -> None:
        pass


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


def test_timeout_and_dead_actor_raise_runtime_errors_naming_actor_and_node(local_ray) -> None:
    actor = local_ray.remote(SlowEngine).options(num_cpus=0).remote()
    assert local_ray.get(actor.node_ip.remote(), timeout=120) == "10.1.2.3"  # started (as connect_engine waits)
    engine = RemoteEngine(actor, name="rollout-engine-0:/runs/x", node_ip="10.1.2.3", call_timeout_s=1.0)
    weights = [("a", torch.ones(2, 3, dtype=torch.bfloat16)), ("b", torch.full((4,), 0.5))]
    engine.load_weights(weights)
    assert local_ray.get(actor.weight_sums.remote()) == [6.0, 2.0]

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rollout engine actor 'rollout-engine-0:/runs/x' on node 10\.1\.2\.3 "
                                           r"did not finish generating within cluster.engine_call_timeout_s=1s"):
        engine.generate([[1, 2]], SamplingConfig())
    assert time.monotonic() - start < 10

    local_ray.kill(actor)
    with pytest.raises(RuntimeError, match=r"'rollout-engine-0:/runs/x' on node 10\.1\.2\.3 died while loading weights"):
        engine.load_weights(weights)
    engine.close()  # a dead actor closes quietly
    with pytest.raises(RuntimeError, match="is closed"):
        engine.generate([[1, 2]], SamplingConfig())
