"""Replaying rollouts.jsonl: a step whose groups are incomplete (a file cut short) is refused, not
trained on with the wrong group sizes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megatron_rl.data.dataset import PromptExample
from megatron_rl.trainer.phases import _replay


def _trainer(path, n):
    examples = [PromptExample(row=None, file="/data/train.parquet", row_index=i, prompt_text="",
                              prompt_token_ids=(i, 7)) for i in range(2)]
    return SimpleNamespace(cfg=SimpleNamespace(trainer=SimpleNamespace(replay_rollouts=str(path)),
                                               rollout=SimpleNamespace(n=n)),
                           train_set=SimpleNamespace(examples=examples))


def _record(prompt, sample):
    return {"step": 1, "file": "train.parquet", "row_index": prompt, "prompt_token_ids": [prompt, 7],
            "prompt_index": prompt, "sample_index": sample, "token_ids": [1, 2], "logprobs": [-0.1, -0.2],
            "finish_reason": "stop", "text": "x", "reward": 0.0}


def test_a_complete_step_replays_and_a_cut_short_one_is_refused(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    records = [_record(p, s) for p in (0, 1) for s in (0, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts, rollouts = _replay(_trainer(path, n=2), 1)
    assert [e.row_index for e in prompts] == [0, 1] and len(rollouts) == 4
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:3]) + json.dumps(records[3])[:20])
    with pytest.raises(ValueError, match=r"at step 1 prompt 1 has samples \[0\], not 0..1 \(rollout.n=2\)"):
        _replay(_trainer(path, n=2), 1)
