"""Packing rollouts into padded tensors and splitting them into micro-batches."""

import pytest
import torch

from megatron_rl.rollout.base import Rollout
from megatron_rl.trainer.batch import broadcast_batch, make_micro_batches, pack_rollouts


def _rollout(prompt_index, sample_index, tokens, logprobs, finish="stop"):
    return Rollout(prompt_index, sample_index, tuple(tokens), "", tuple(logprobs), finish)


def test_pack_places_response_tokens_and_logprobs_at_their_target_positions():
    prompts = [(10, 11, 12), (20,)]
    rollouts = [_rollout(0, 0, [13, 14], [-0.5, -0.25]), _rollout(1, 0, [21, 22, 23], [-1.0, -2.0, -3.0], "length")]
    batch = pack_rollouts(prompts, rollouts, [1.0, -1.0], pad_id=0)
    # Row 0: ids 10 11 12 13 14; position t scores ids[t + 1], so the response (ids 3, 4) sits at t = 2, 3.
    # Row 1: ids 20 21 22 23 0; the response (ids 1..3) sits at t = 0, 1, 2; t = 3 scores padding.
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 23, 0]]
    assert batch.response_mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert batch.rollout_logprobs.tolist() == [[0.0, 0.0, -0.5, -0.25], [-1.0, -2.0, -3.0, 0.0]]
    assert batch.group_index.tolist() == [0, 1]
    assert batch.truncated.tolist() == [False, True]
    assert batch.response_lengths.tolist() == [2, 3]
    assert broadcast_batch(batch, src=0, group=None) is batch


def test_pack_rejects_mismatched_rewards():
    with pytest.raises(ValueError, match="2 rollouts but 1 rewards"):
        pack_rollouts([(1,)], [_rollout(0, 0, [2], [-1.0]), _rollout(0, 1, [3], [-1.0])], [0.0], pad_id=0)


def test_micro_batches_cover_the_chosen_rows_in_order():
    prompts = [(1, 2)]
    rollouts = [_rollout(0, j, [3 + j], [-0.1 * (j + 1)]) for j in range(4)]
    batch = pack_rollouts(prompts, rollouts, [0.0, 1.0, 0.0, 1.0], pad_id=0)
    advantages = torch.arange(4.0).unsqueeze(-1).expand(4, 2)
    rows = torch.tensor([3, 1, 2, 0])
    micro = make_micro_batches(batch, rows, micro_batch_size=2, loss_mask=batch.response_mask, old_logprobs=None,
                               advantages=advantages, ref_logprobs=None)
    assert [mb.input_ids[:, -1].tolist() for mb in micro] == [[6, 4], [5, 3]]
    assert [mb.advantages[:, 0].tolist() for mb in micro] == [[3.0, 1.0], [2.0, 0.0]]
    assert micro[0].old_logprobs is None and micro[0].rollout_logprobs[:, 1].tolist() == pytest.approx([-0.4, -0.2])
    with pytest.raises(ValueError, match="micro_batch_size=3 does not divide the 4 sequences"):
        make_micro_batches(batch, rows, micro_batch_size=3, loss_mask=batch.response_mask, old_logprobs=None,
                           advantages=advantages, ref_logprobs=None)
