"""`megatron-rl train` with every memory hand-over recorded: run by tests/trainer/test_colocation.py
(one process, or under torchrun) as ``python _recording_run.py EVENTS_DIR CONFIG [overrides...]``.

Each rank writes EVENTS_DIR/rank{R}.json: ``{"engine": whether this rank built an engine, "events": [...]}``,
the events in call order: engine calls (``generate``, ``sleep``, ``wake_up:<tags>``, ``load_weights``,
``engine_weights``; the engine's own state is checked by VLLMEngine itself, which refuses to generate
or take a push asleep), ``optimizer_to_host`` / ``optimizer_to_device``, ``reference_onload`` /
``reference_offload``, ``update`` (one optimizer step), ``validate`` and ``save``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EVENTS: list[str] = []


class RecordingEngine:
    """Wraps the run's engine and records the calls the trainer makes on it."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def generate(self, *args, **kwargs):
        EVENTS.append("generate")
        return self._engine.generate(*args, **kwargs)

    def sleep(self) -> None:
        EVENTS.append("sleep")
        self._engine.sleep()

    def wake_up(self, tags=None) -> None:
        EVENTS.append("wake_up:" + ",".join(tags) if tags is not None else "wake_up:all")
        self._engine.wake_up(tags=tags)

    def load_weights(self, weights) -> None:
        if not EVENTS or EVENTS[-1] != "load_weights":  # one event per push, not per bucket
            EVENTS.append("load_weights")
        self._engine.load_weights(weights)

    def engine_weights(self):
        EVENTS.append("engine_weights")
        return self._engine.engine_weights()

    def close(self) -> None:
        self._engine.close()


def _record(name: str, function):
    def wrapped(*args, **kwargs):
        EVENTS.append(name)
        return function(*args, **kwargs)

    return wrapped


def main() -> None:
    events_dir, config, *overrides = sys.argv[1:]
    from megatron_rl.config import load_config
    from megatron_rl.megatron import offload, reference
    from megatron_rl.trainer import colocation, loop, setup

    built = {}
    build_engine = setup.build_engine

    def recording_build_engine(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        built["engine"] = engine is not None
        return None if engine is None else RecordingEngine(engine)

    setup.build_engine = recording_build_engine
    offload.OptimizerOffload.to_host = _record("optimizer_to_host", offload.OptimizerOffload.to_host)
    offload.OptimizerOffload.to_device = _record("optimizer_to_device", offload.OptimizerOffload.to_device)
    reference.onload_reference = _record("reference_onload", reference.onload_reference)
    reference.offload_reference = _record("reference_offload", reference.offload_reference)
    colocation.offload_reference = reference.offload_reference
    loop.train_step = _record("update", loop.train_step)
    loop.Trainer.validate = _record("validate", loop.Trainer.validate)
    loop.Trainer.save_checkpoint = _record("save", loop.Trainer.save_checkpoint)
    try:
        loop.train(load_config(config, overrides))
    finally:
        rank = os.environ.get("RANK", "0")
        Path(events_dir).mkdir(parents=True, exist_ok=True)
        (Path(events_dir) / f"rank{rank}.json").write_text(json.dumps({"engine": built.get("engine"),
                                                                      "events": EVENTS}))


if __name__ == "__main__":
    main()
