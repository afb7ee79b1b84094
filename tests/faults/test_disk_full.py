"""Disk full while saving: the run's checkpoints live on a tmpfs with room for one checkpoint (a
private mount namespace, `unshare`), so the second save hits ENOSPC. The first checkpoint survives,
the error says what happened and what is intact, and the partial directory is gone."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from _faults import FAST, REPO, chaos_command
from _trainer_runs import _env

from megatron_rl.trainer.checkpoint import CheckpointManager


def _private_mounts_work() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_mounts_work(), reason="this machine cannot make a private tmpfs "
                    "(`unshare -rm` + `mount -t tmpfs` failed); tests/trainer/test_checkpoint_manager.py "
                    "covers a save that raises ENOSPC")
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    run, after = tmp_path / "run", tmp_path / "after"
    (run / "checkpoints").mkdir(parents=True)
    args = (*FAST, "trainer.total_steps=2", "trainer.save_freq=1", "trainer.export_hf=false")
    train = shlex.join(chaos_command(run, *args))
    # one checkpoint of the tiny model is 5.2 MiB: the second cannot fit beside the first
    script = (f"mount -t tmpfs -o size=8m tmpfs {run}/checkpoints && {train}; code=$?; "
              f"mkdir {after} && cp -a {run}/checkpoints {after}/; exit $code")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode != 0
    first = run / "checkpoints" / "step_00000001"
    assert "could not write the checkpoint of step 2" in proc.stderr, proc.stderr[-4000:]
    assert "were free on" in proc.stderr and "(the disk is full)" in proc.stderr
    assert f"the previous checkpoint {first} is intact" in proc.stderr
    saved = CheckpointManager(after, keep_last=2)  # what the tmpfs held when the run ended
    assert sorted(p.name for p in saved.root.iterdir()) == ["step_00000001"]  # no partial directory either
    assert saved.load_latest(lambda path: None)[0] == 1  # its files are all there, at their sizes
