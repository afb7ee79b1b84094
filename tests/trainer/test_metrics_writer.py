"""metrics.jsonl: one record per step, partial last lines ignored, truncation on resume."""

import json
import math

from megatron_rl.trainer.metrics import MetricsWriter, PhaseTimer, read_metrics, truncate_step_records


def test_writer_appends_records_and_maps_non_finite_values_to_null(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log(1, {"reward/mean": 0.5, "actor/grad_norm": math.inf})
    writer.log(2, {"reward/mean": 0.75})
    writer.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "actor/grad_norm": None, "reward/mean": 0.5}, {"step": 2, "reward/mean": 0.75}]


def test_truncate_drops_later_steps_and_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(5)) + '{"step": 5, "x"')
    assert truncate_step_records(path, 2) == 2  # steps 3 and 4 (the partial line is not a record)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    assert truncate_step_records(tmp_path / "missing.jsonl", 1) == 0


def test_phase_timer_accumulates_per_phase():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("update"):
            pass
    assert list(timer.seconds) == ["time/update_s"] and timer.seconds["time/update_s"] >= 0.0
