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


def test_token_budget_groups_hand_checked():
    from megatron_rl.megatron.forward import token_budget_micro_batches

    # Longest first (9, 8, 5, 3 = rows 1, 3, 0, 2); a micro-batch costs rows x its longest row:
    # 9 + 8 = 2 x 9 = 18 > 16 -> [1] alone; [3, 0] = 2 x 8 = 16; adding row 2 would cost 3 x 8 = 24 -> [2].
    assert token_budget_micro_batches([5, 9, 3, 8], 16) == [[1], [3, 0], [2]]
    assert token_budget_micro_batches([5, 9, 3, 8], 36) == [[1, 3, 0, 2]]  # 4 x 9 = 36
    assert token_budget_micro_batches([5, 9, 3, 8], 4) == [[1], [3], [0], [2]]  # 9, 8, 5 exceed it: alone
    assert token_budget_micro_batches([4, 4, 4], 8) == [[0, 1], [2]]  # ties keep row order
    assert token_budget_micro_batches([], 8) == []
    with pytest.raises(ValueError, match="max_tokens=0 must be >= 1"):
        token_budget_micro_batches([4], 0)


def test_sequence_lengths_end_at_the_last_masked_target():
    from megatron_rl.megatron.forward import sequence_lengths

    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 2:4] = True  # targets 3, 4 -> tokens 0..4: 5
    mask[1, 5] = True  # the last target, token 6 -> 7 (the full width)
    assert sequence_lengths(mask) == [5, 7, 2]  # a row without targets: 2 (one target position, masked)


def _mixed_batch():
    """8 rollouts: prompts of 2..12 tokens, responses of 1..9 (T = 15); one group."""
    generator = torch.Generator().manual_seed(5)
    prompt_lengths, response_lengths = (3, 9, 5, 12, 4, 7, 2, 10), (6, 2, 9, 3, 1, 8, 5, 4)
    prompts = [tuple(torch.randint(1, 50, (n,), generator=generator).tolist()) for n in prompt_lengths]
    rollouts = [_rollout(i, 0, torch.randint(1, 50, (n,), generator=generator).tolist(), [-0.5] * n)
                for i, n in enumerate(response_lengths)]
    return pack_rollouts(prompts, rollouts, [float(i) for i in range(8)], pad_id=0)


def test_token_budget_micro_batches_cover_each_row_once_cut_to_their_length():
    from megatron_rl.trainer.batch import padded_tokens

    batch = _mixed_batch()  # sequence lengths 9, 11, 14, 15, 5, 15, 7, 14
    rows = torch.tensor([4, 0, 6, 2, 1, 7, 3, 5])  # a shuffled mini-batch
    advantages = torch.arange(8.0).unsqueeze(-1).expand(8, 14)
    old = torch.randn(8, 14, generator=torch.Generator().manual_seed(0))
    kwargs = {"micro_batch_size": 4, "loss_mask": batch.response_mask, "old_logprobs": old, "advantages": advantages,
              "ref_logprobs": None}
    fixed = make_micro_batches(batch, rows, **kwargs)
    budget = make_micro_batches(batch, rows, max_tokens_per_micro_batch=32, **kwargs)
    # Longest first: 15, 15 (rows 3, 5: 30 tokens), 14, 14 (rows 2, 7: 28), 11, 9 (rows 1, 0: 22), 7, 5 (rows 6, 4).
    assert [mb.advantages[:, 0].tolist() for mb in budget] == [[3.0, 5.0], [2.0, 7.0], [1.0, 0.0], [6.0, 4.0]]
    assert [tuple(mb.input_ids.shape) for mb in budget] == [(2, 15), (2, 14), (2, 11), (2, 7)]
    assert padded_tokens(budget) == 30 + 28 + 22 + 14 == 94 < padded_tokens(fixed) == 8 * 15 == 120
    for mb in budget:
        for r in range(mb.input_ids.shape[0]):
            row = int(mb.advantages[r, 0])
            width = mb.input_ids.shape[1]
            assert torch.equal(mb.input_ids[r], batch.input_ids[row, :width])
            assert not batch.response_mask[row, width - 1 :].any()  # nothing of the response was cut
            assert torch.equal(mb.response_mask[r], batch.response_mask[row, : width - 1])
            assert torch.equal(mb.old_logprobs[r], old[row, : width - 1])
            assert torch.equal(mb.rollout_logprobs[r], batch.rollout_logprobs[row, : width - 1])
    # A budget below the longest sequence: those rows run alone; the rest still pack.
    tight = make_micro_batches(batch, rows, max_tokens_per_micro_batch=14, **kwargs)
    # 15, 15, 14, 14, 11 and 9 alone; 7 and 5 together: 2 x 7 = 14
    assert [mb.input_ids.shape[0] for mb in tight] == [1, 1, 1, 1, 1, 1, 2]
