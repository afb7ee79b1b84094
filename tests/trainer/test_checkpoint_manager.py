"""Run checkpoints: atomic directories, keep-last-K, fallback past a damaged one (one process)."""

import json
import shutil
from pathlib import Path

import pytest

from megatron_rl.trainer.checkpoint import STATE_FILE, CheckpointManager


def _writer(payload):
    return lambda tmp: (tmp / "shard.bin").write_bytes(payload)


def test_save_keeps_the_last_k_and_leaves_no_temporary_directory(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, {"sampler": {"epoch": 0}}, write_shards=_writer(bytes([step])),
                     write_extra=lambda tmp: (tmp / "config.yaml").write_text("x: 1\n"))
    assert [step for step, _ in manager.complete()] == [2, 3]
    assert sorted(p.name for p in manager.root.iterdir()) == ["step_00000002", "step_00000003"]
    state = json.loads((manager.step_dir(3) / STATE_FILE).read_text())
    assert state == {"step": 3, "sampler": {"epoch": 0}, "files": {"config.yaml": 5, "shard.bin": 1}}
    assert (manager.step_dir(3) / "config.yaml").is_file()


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_new_one(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(1, {}, write_shards=_writer(b"a"))

    def fail(tmp):
        (tmp / "half").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as raised:
        manager.save(2, {}, write_shards=fail)
    assert raised.value.errno == 28
    assert f"the previous checkpoint {manager.step_dir(1)} is intact" in str(raised.value)
    assert [step for step, _ in manager.complete()] == [1]
    assert not (manager.root / ".tmp-step_00000002").exists()  # its space is given back at once


def test_before_rename_runs_once_the_files_are_written_and_before_the_checkpoint_counts(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, {}, write_shards=_writer(b"a"))
    seen = []

    def before_rename():  # what the loop does there: append the step's metrics line
        tmp = manager.root / ".tmp-step_00000002"
        seen.append((sorted(p.name for p in tmp.iterdir()), [step for step, _ in manager.complete()]))

    manager.save(2, {}, write_shards=_writer(b"b"), before_rename=before_rename)
    assert seen == [(["shard.bin", STATE_FILE], [1])]  # complete files, not yet a checkpoint
    assert [step for step, _ in manager.complete()] == [1, 2]

    def killed():
        raise KeyboardInterrupt  # a kill between the metrics line and the rename

    with pytest.raises(KeyboardInterrupt):
        manager.save(3, {}, write_shards=_writer(b"c"), before_rename=killed)
    assert [step for step, _ in manager.complete()] == [1, 2]  # no checkpoint 3: the resume drops its line


def test_load_latest_falls_back_past_damaged_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager.save(step, {"mark": step}, write_shards=_writer(bytes([step])))
    (manager.step_dir(3) / STATE_FILE).write_text('{"step": 3, "ma')  # truncated JSON
    (manager.step_dir(2) / "shard.bin").write_bytes(b"")  # the shard loader will refuse this one
    loaded = []

    def load(path):
        if not (path / "shard.bin").read_bytes():
            raise ValueError(f"{path / 'shard.bin'} is empty")
        loaded.append(path.name)

    step, state = manager.load_latest(load)
    assert (step, state["mark"], loaded) == (1, 1, ["step_00000001"])


def test_load_latest_rejects_a_state_whose_step_disagrees_with_its_directory(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(4, {}, write_shards=_writer(b"a"))
    (manager.step_dir(4) / STATE_FILE).write_text(json.dumps({"step": 7}))
    assert manager.load_latest(lambda path: None) is None


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "shard.bin").write_bytes(b"ab"), "shard.bin: 2 bytes, 3 when saved"),
    (lambda d: (d / "shard.bin").unlink(), "shard.bin: missing"),
])
def test_a_truncated_or_missing_file_is_named_and_the_previous_checkpoint_loads(tmp_path, caplog, damage, named):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2):
        manager.save(step, {"mark": step}, write_shards=_writer(bytes([step]) * 3))
    damage(manager.step_dir(2))
    loaded = []
    step, state = manager.load_latest(lambda path: loaded.append(path.name))
    assert (step, state, loaded) == (1, {"step": 1, "mark": 1}, ["step_00000001"])  # step 2's shards never read
    assert f"{manager.step_dir(2)}/{named}" in caplog.text and "falling back to the previous one" in caplog.text


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_damaged_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, {}, write_shards=_writer(b"a"))

    rmtree = shutil.rmtree

    def killed(path, **kwargs):
        if Path(path).exists() and Path(path).name.startswith(".tmp-delete-"):
            (Path(path) / "shard.bin").unlink()  # half deleted when the process dies
            raise KeyboardInterrupt
        rmtree(path, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, {}, write_shards=_writer(b"b"))
    monkeypatch.undo()
    assert [step for step, _ in manager.complete()] == [2]  # step 1's directory went under a temporary name
    assert manager.remove_partial() == [manager.root / ".tmp-delete-step_00000001"]
