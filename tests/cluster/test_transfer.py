"""Weights to a separate engine over torch.distributed (gloo here): the transfer group on its own, then
RemoteEngine with a stand-in engine actor (real EngineActor methods, a recording engine inside)."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from ray import cloudpickle

from megatron_rl.cluster.config import ClusterConfig
from megatron_rl.cluster.engine import EngineActor, RemoteEngine, _join_transfer
from megatron_rl.cluster.transfer import ENGINE_RANK, TRAINER_RANK, Receiver, TransferGroup, describe, open_store


def _bucket(seed: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [("layers.0.q.weight", torch.randn(64, 32, generator=generator)),
            ("layers.0.q.bias", torch.randn(64, generator=generator).to(torch.bfloat16)),
            ("norm.weight", torch.randn(32, generator=generator).to(torch.float16)),
            ("lm_head.weight", torch.randn(100, 32, generator=generator))]


def _pair(timeout_s: float = 30.0) -> tuple[TransferGroup, TransferGroup]:
    """Both sides of a gloo transfer group in this process (the engine side joins from a thread)."""
    store = open_store("127.0.0.1", timeout_s)
    engine: list[TransferGroup] = []
    thread = threading.Thread(target=lambda: engine.append(TransferGroup.join(
        host="127.0.0.1", port=store.port, rank=ENGINE_RANK, backend="gloo", timeout_s=timeout_s, node_ip="127.0.0.1")))
    thread.start()
    trainer = TransferGroup.join(host="127.0.0.1", port=store.port, rank=TRAINER_RANK, backend="gloo",
                                 timeout_s=timeout_s, node_ip="127.0.0.1", store=store)
    thread.join(timeout_s)
    return trainer, engine[0]


def test_buckets_arrive_bitwise_in_reused_buffers() -> None:
    trainer, engine = _pair()
    receiver = Receiver(engine.device)
    try:
        for seed in (0, 1):
            bucket = _bucket(seed)
            received: list = []
            thread = threading.Thread(target=lambda: received.extend(  # noqa: B023 (joined in this iteration)
                receiver.receive(engine, describe(bucket), src=TRAINER_RANK)))
            thread.start()
            for work in trainer.send([t for _, t in bucket]):
                work.wait()
            thread.join(30)
            assert [n for n, _ in received] == [n for n, _ in bucket]
            for (_, sent), (_, got) in zip(bucket, received, strict=True):
                assert got.dtype == sent.dtype and got.shape == sent.shape
                assert torch.equal(got, sent)
            if seed == 0:
                pointers = {dtype: buffer.data_ptr() for dtype, buffer in receiver.buffers.items()}
        # the second bucket (same shapes) landed in the buffers of the first: nothing allocated
        assert {dtype: buffer.data_ptr() for dtype, buffer in receiver.buffers.items()} == pointers
        assert receiver.buffer_bytes == sum(t.numel() * t.element_size() for _, t in _bucket(0))
    finally:
        trainer.close()
        engine.close()


def test_a_broadcast_to_a_closed_peer_fails_instead_of_hanging() -> None:
    trainer, engine = _pair(timeout_s=5.0)
    engine.close()
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        for work in trainer.send([torch.ones(1 << 20)]):
            work.wait()
    assert time.monotonic() - start < 30
    trainer.close()


class RecordingEngine:
    """What the stand-in actor hosts: load_weights records the tensors it is handed (copies)."""

    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()

    def engine_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.loaded)

    def generate(self, prompt_token_ids, sampling):
        time.sleep(30)

    def close(self) -> None:
        pass


class StandInEngineActor(EngineActor):
    """EngineActor's transfer methods as they are, around a RecordingEngine instead of vLLM."""

    def __init__(self) -> None:  # noqa: D107 (no engine to build)
        self.engine = RecordingEngine()
        self.transfer = self.receiver = None
        self._outgoing = []

    def loaded(self) -> dict[str, tuple[tuple[int, ...], str, float]]:
        return {n: (tuple(t.shape), str(t.dtype), float(t.double().sum())) for n, t in self.engine.loaded.items()}


class FailingEngineActor(StandInEngineActor):
    """Raises before receiving a bucket: the trainer's broadcasts find no taker."""

    def receive_weights(self, metas) -> int:
        raise ValueError("the engine refused the bucket")


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


class ArgumentRecorder:
    """Wraps an actor handle: records the types of every argument of every call made through it."""

    def __init__(self, actor) -> None:
        self._actor, self.argument_types = actor, []

    def __getattr__(self, method: str):
        remote_method = getattr(self._actor, method)
        recorder = self

        class _Method:
            def remote(self, *args, **kwargs):
                recorder.argument_types.extend(_leaf_types([*args, *kwargs.values()]))
                return remote_method.remote(*args, **kwargs)

        return _Method()


def _leaf_types(value) -> list[type]:
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _leaf_types(item)]
    return [type(value)]


def _wait_until_dead(ray, actor, timeout_s: float = 60.0) -> None:
    """``ray.kill`` returns before the actor is gone: a call made right after may still run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.loaded.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.2)
    raise AssertionError(f"the killed actor still answers after {timeout_s:g}s")


def test_remote_engine_broadcasts_weights_and_stops_on_a_dead_engine(local_ray) -> None:
    actor = local_ray.remote(StandInEngineActor).options(num_cpus=0).remote()
    cluster = ClusterConfig(engine_call_timeout_s=60.0, engine_start_timeout_s=120.0)
    recorder = ArgumentRecorder(actor)
    transfer = _join_transfer(recorder, name="rollout-engine-0:/runs/x", node_ip="10.1.2.3", cluster=cluster)
    engine = RemoteEngine(recorder, name="rollout-engine-0:/runs/x", node_ip="10.1.2.3", call_timeout_s=10.0,
                          transfer=transfer)
    assert engine.transport == "broadcast"
    for seed in (0, 1):  # two syncs
        bucket = _bucket(seed)
        engine.load_weights(bucket[:2])
        engine.load_weights(bucket[2:])
        loaded = local_ray.get(actor.loaded.remote())
        assert loaded == {n: (tuple(t.shape), str(t.dtype), float(t.double().sum())) for n, t in bucket}
        read_back = engine.engine_weights()  # the engine's weights, broadcast back over the group
        for name, tensor in bucket:
            assert torch.equal(read_back[name], tensor)
    # only metadata travelled as Ray call arguments: strings and ints, never a tensor or an array
    assert set(recorder.argument_types) <= {str, int, float}, set(recorder.argument_types)

    local_ray.kill(actor)
    _wait_until_dead(local_ray, actor)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"'rollout-engine-0:/runs/x' on node 10\.1\.2\.3 died while loading "
                                           r"weights"):
        engine.load_weights(_bucket(2))
    assert time.monotonic() - start < 10  # the call timeout
    with pytest.raises(RuntimeError, match="is closed"):
        engine.load_weights(_bucket(3))
    engine.close()


def test_an_engine_that_raises_mid_transfer_stops_the_trainer_at_once(local_ray) -> None:
    """The trainer's broadcast of 256 MiB has no taker; its error must not wait for the group's timeout."""
    actor = local_ray.remote(FailingEngineActor).options(num_cpus=0).remote()
    cluster = ClusterConfig(engine_call_timeout_s=120.0, engine_start_timeout_s=120.0)
    transfer = _join_transfer(actor, name="rollout-engine-0:/runs/y", node_ip="10.1.2.3", cluster=cluster)
    engine = RemoteEngine(actor, name="rollout-engine-0:/runs/y", node_ip="10.1.2.3", call_timeout_s=120.0,
                          transfer=transfer)
    start = time.monotonic()
    with pytest.raises(ValueError, match="the engine refused the bucket"):
        engine.load_weights([("big", torch.ones(64 << 20))])
    assert time.monotonic() - start < 60  # well inside the 120 s timeout of the call and the group
    with pytest.raises(RuntimeError, match="is closed"):
        engine.load_weights(_bucket(0))
    engine.close()
