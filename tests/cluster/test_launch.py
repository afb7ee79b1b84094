"""The Ray launch on this machine (CPU, gloo): trainer ranks as actors, a separate rollout engine actor,
failures that stop the run with a clear error instead of a hang.

Ray runs locally with 4 logical CPUs (conftest); the model is the 1-layer tiny model and steps are a
few 8-token responses, so the time goes to starting processes, not to training.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from megatron_rl.cluster.engine import engine_actor_name
from megatron_rl.cluster.launch import TrainerFailed, launch
from megatron_rl.config import load_config

REPO = Path(__file__).resolve().parents[2]

TINY_RUN = ["model.tiny_layers=1", "data.builtin_num_train=16", "data.builtin_num_test=4", "data.batch_size=2",
            "data.max_prompt_length=256", "rollout.n=2", "rollout.max_response_length=8", "rollout.kv_cache_gib=0.25",
            "algorithm.micro_batch_size=4", "trainer.sft_warmup_steps=0", "trainer.test_freq=0",
            "trainer.export_hf=false", "trainer.progress_bar=false", "parallel.tp=2", "cluster.num_trainers=2"]
"""Two trainer ranks (TP=2, DP=1), two prompts x two 8-token responses per step."""


def _config(run_dir: Path, *overrides: str):
    return load_config(REPO / "examples" / "quickstart.yaml",
                       [*TINY_RUN, f"trainer.output_dir={run_dir}", *overrides])


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_all_cpus(ray, expected: float, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        available = ray.available_resources().get("CPU", 0.0)
        if available >= expected:
            return available
        time.sleep(0.5)
    return ray.available_resources().get("CPU", 0.0)


def test_two_trainer_ranks_and_a_separate_vllm_engine_run_two_grpo_steps(local_ray, tmp_path: Path) -> None:
    """rollout.check_weights makes every sync read the engine's weights back and compare them with the
    trainer's shards exactly (the run fails otherwise). The entropy bonus gives every step a non-zero
    gradient (the tiny model's rewards are all equal, so its advantages are 0): each sync pushes new weights.
    The weights travel over the feeding rank's gloo group with the engine actor (the default transport; what
    crosses Ray then is metadata only: tests/cluster/test_transfer.py)."""
    cfg = _config(tmp_path / "run", "rollout.mode=separate", "rollout.check_weights=true", "trainer.total_steps=2",
                  "algorithm.entropy_coef=0.01", "cluster.weight_transport=broadcast")
    result = launch(cfg)
    assert result.run_dir == (tmp_path / "run").resolve()
    steps = _metrics(result.run_dir)
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["actor/grad_norm"] > 0 and m["actor/update_successful"] == 1.0  # the weights changed
        assert m["sync/bytes"] > 0 and m["sync/buckets"] >= 1
        # the engine sampled with the weights the trainer had: its logprobs are the trainer's
        assert m["rollout/logprob_gap_mean"] < 1e-4
    assert (result.run_dir / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
    assert set(result.startup_s) == {"ray_init", "placement", "actors", "train"}
    # nothing of the run is left: the engine died with its owner, the CPUs are free again
    with pytest.raises(ValueError):
        local_ray.get_actor(engine_actor_name(cfg, 0))
    assert _wait_for_all_cpus(local_ray, 4.0) == 4.0


def test_killing_the_engine_stops_the_run_with_a_clear_error(local_ray, tmp_path: Path) -> None:
    """The engine actor is killed after the first step (and its checkpoint): the feeding rank's next call
    fails, the driver kills the other rank (blocked in a collective) and raises; the checkpoint stays whole.
    The engine is the transformers one here (starts faster; the failure path is the same)."""
    run_dir = tmp_path / "run"
    cfg = _config(run_dir, "rollout.mode=separate", "rollout.backend=hf", "trainer.total_steps=500",
                  "trainer.save_freq=1", "cluster.engine_call_timeout_s=60")
    killed_at: list[float] = []

    def kill_engine_after_first_step() -> None:
        while not _metrics(run_dir):
            time.sleep(0.2)
        local_ray.kill(local_ray.get_actor(engine_actor_name(cfg, 0)))
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_engine_after_first_step, daemon=True)
    killer.start()
    with pytest.raises(TrainerFailed) as failure:
        launch(cfg)
    stopped_at = time.monotonic()
    assert killed_at, "the run ended before the engine was killed"
    assert stopped_at - killed_at[0] < 60  # cluster.engine_call_timeout_s
    message = str(failure.value)
    assert message.startswith("trainer rank 0 on node ")
    assert "rollout engine actor 'rollout-engine-0:" in message and "died while" in message

    last_logged = _metrics(run_dir)[-1]["step"]
    complete = sorted((run_dir / "checkpoints").glob("step_*"))
    assert complete, "no checkpoint was written"
    last = complete[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == int(last.name.removeprefix("step_")) >= last_logged - 1 >= 0
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(last)).read_metadata()
    assert any("embedding" in key for key in metadata.state_dict_metadata)
    assert _wait_for_all_cpus(local_ray, 4.0) == 4.0


def test_no_step_within_the_step_timeout_stops_the_run(local_ray, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "run", "cluster.step_timeout_s=2", "trainer.total_steps=2")
    start = time.monotonic()
    with pytest.raises(TrainerFailed, match=r"no progress for \d+s waiting for the first step; "
                                            r"cluster.step_timeout_s=2\. Still running: rank 0 on"):
        launch(cfg)
    assert time.monotonic() - start < 60
    assert _wait_for_all_cpus(local_ray, 4.0) == 4.0
