"""results.jsonl on resume: whole prompts kept, an interrupted tail dropped, corruption refused."""

from __future__ import annotations

import json

import pytest

from megatron_rl.evaluation.results import append_prompt, load_completed
from megatron_rl.evaluation.runner import contiguous_batches


def _records(prompt: str, n: int, budget=None) -> list[dict]:
    return [{"id": prompt, "budget": budget, "sample_index": j, "response": f"{prompt}-{j}"} for j in range(n)]


def test_partial_last_line_and_incomplete_prompt_are_dropped(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    append_prompt(path, _records("a", 2))
    append_prompt(path, _records("b", 2, budget=512))
    with open(path, "a") as f:  # a write cut short: one whole line of prompt c, then half a line
        f.write(json.dumps(_records("c", 2)[0]) + "\n" + '{"id": "c", "bud')
    done = load_completed(path, n=2)
    assert sorted(done) == [("a", None), ("b", 512)]
    assert [r["sample_index"] for r in done[("b", 512)]] == [0, 1]
    # The file now holds exactly the kept prompts, so appending prompt c again cannot duplicate it.
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "a", "b", "b"]
    append_prompt(path, _records("c", 2))
    assert sorted(load_completed(path, n=2)) == [("a", None), ("b", 512), ("c", None)]


def test_missing_file_is_empty(tmp_path) -> None:
    assert load_completed(tmp_path / "results.jsonl", n=3) == {}


def test_a_bad_line_before_the_end_is_refused(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(_records("a", 1)[0]) + "\nnot json\n" + json.dumps(_records("b", 1)[0]) + "\n")
    with pytest.raises(ValueError, match=r"results.jsonl: line 2 is not valid JSON"):
        load_completed(path, n=1)


def test_results_of_another_n_are_refused(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    append_prompt(path, _records("a", 4))
    with pytest.raises(ValueError, match=r"prompt 'a' \(budget None\) has 4 samples, more than n=2"):
        load_completed(path, n=2)


def test_contiguous_batches() -> None:
    assert contiguous_batches([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert contiguous_batches([1, 2, 5, 6, 7], 8) == [[1, 2], [5, 6, 7]]
    assert contiguous_batches([], 4) == []
