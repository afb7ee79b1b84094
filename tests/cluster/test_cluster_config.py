"""The cluster section of the run config, and the launch's checks that need no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rl.cluster.launch import DistEnv, _last_logged_step, launch
from megatron_rl.config import load_config


@pytest.mark.parametrize(("override", "message"), [
    ("cluster.num_trainers=0", "cluster.num_trainers=0 must be >= 1"),
    ("cluster.device=tpu", "cluster.device='tpu' is not allowed; choose one of 'auto', 'gpu', 'cpu'"),
    ("cluster.step_timeout_s=0", "cluster.step_timeout_s=0.0 must be > 0"),
    ("cluster.weight_transport=nfs", "cluster.weight_transport='nfs' is not allowed"),
    ("cluster.ranks_per_node=-1", "cluster.ranks_per_node=-1 must be >= 0"),
])
def test_bad_cluster_values_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_num_trainers_must_fill_whole_model_replicas() -> None:
    cfg = load_config(None, ["parallel.tp=2", "cluster.num_trainers=3"])
    with pytest.raises(ValueError, match=r"cluster.num_trainers=3 is not a multiple of parallel.tp x parallel.pp = 2"):
        launch(cfg)


def test_dist_env_variables() -> None:
    assert DistEnv("10.0.0.5", 29500, 3, 8).variables() == {
        "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}


def test_last_logged_step_skips_a_line_being_written(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    assert _last_logged_step(metrics) == -1
    metrics.write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2}\n{"step": 3, "rew')
    assert _last_logged_step(metrics) == 2
