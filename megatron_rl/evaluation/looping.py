"""Looping responses: a model that repeats one phrase until it runs out of tokens.

Definition (on token ids, so it is exact and independent of the tokenizer's text):

    A response of tokens t[0..T) *loops with period p* when its last L tokens repeat one block of
    p tokens back to back -- t[i] == t[i - p] for every i in [T - L + p, T) -- with the repeated tail
    long enough to be no accident: L >= MIN_REPEATS * p (the block seen at least 3 times; the last
    copy may be cut short) and L >= MIN_LOOP_TOKENS (64 tokens), for some 1 <= p <= MAX_PERIOD (256).
    Its period is the smallest such p, its loop length the longest such L.

A response that loops and then stops (an end-of-sequence token ends it) does not loop "to its end"
and is not counted; in practice a looping response runs until ``max_tokens`` cuts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

MIN_REPEATS = 3
MIN_LOOP_TOKENS = 64
MAX_PERIOD = 256


class Loop(NamedTuple):
    period: int
    """Tokens in the repeated block (the smallest that repeats)."""
    num_tokens: int
    """Tokens of the repeating tail (L), the first copy of the block included."""


def find_loop(token_ids: Sequence[int], *, min_repeats: int = MIN_REPEATS, min_tokens: int = MIN_LOOP_TOKENS,
              max_period: int = MAX_PERIOD) -> Loop | None:
    """The loop that ends ``token_ids`` (see the module's definition), or None.

    Hand example, ``[5, 1, 2, 3, 1, 2, 3, 1, 2]`` with ``min_tokens=6``: periods 1 and 2 fail at the
    last token (2 != 1, 2 != 3); period 3 matches back to t[3] == t[0]? 3 != 5, so the tail is
    ``1 2 3 1 2 3 1 2``, L = 8. 8 < 3 * 3: None with ``min_repeats=3``; ``Loop(3, 8)`` with 2.
    """
    total = len(token_ids)
    for period in range(1, min(max_period, total // min_repeats) + 1):
        matched = 0  # trailing positions i with t[i] == t[i - period], counted back from the end
        while matched < total - period and token_ids[total - 1 - matched] == token_ids[total - 1 - matched - period]:
            matched += 1
        length = matched + period
        if length >= min_repeats * period and length >= min_tokens:
            return Loop(period, length)
    return None
