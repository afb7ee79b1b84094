"""Looping responses (megatron_rl.evaluation.looping): the definition checked on hand-made token lists."""

from __future__ import annotations

import random

from megatron_rl.evaluation.looping import MIN_LOOP_TOKENS, Loop, find_loop


def test_the_docstring_example_by_hand():
    tokens = [5, 1, 2, 3, 1, 2, 3, 1, 2]  # tail "1 2 3 1 2 3 1 2": 8 tokens of period 3 (t[3]=3 != t[0]=5)
    assert find_loop(tokens, min_tokens=6) is None  # 8 < 3 copies x 3 tokens
    assert find_loop(tokens, min_tokens=6, min_repeats=2) == Loop(3, 8)


def test_a_phrase_repeated_to_the_end_loops_with_its_smallest_period():
    phrase = [11, 12, 13, 14, 15]
    text = [1, 2, 3, 4] + phrase * 20  # 100 repeated tokens after 4 others
    assert find_loop(text) == Loop(5, 100)
    assert find_loop(text + phrase[:2]) == Loop(5, 102)  # cut mid-copy by max_tokens: still looping
    assert find_loop([7] * 64) == Loop(1, 64)  # one token 64 times: period 1, not 2 or 4
    assert find_loop([7] * 63) is None  # under MIN_LOOP_TOKENS
    assert MIN_LOOP_TOKENS == 64


def test_a_loop_that_stops_or_a_short_repetition_is_no_loop():
    phrase = [11, 12, 13, 14, 15]
    assert find_loop(phrase * 20 + [0]) is None  # an end-of-sequence token after the loop: it ended
    assert find_loop([9] * 10 + [1, 2] * 20) is None  # a 40-token tail (t[11]=2 != t[9]=9): under 64
    assert find_loop([9] * 10 + [1, 2] * 32) == Loop(2, 64)
    assert find_loop(list(range(40)) * 2) is None  # a 40-token block twice: fewer than 3 copies
    assert find_loop(list(range(40)) * 3) == Loop(40, 120)


def test_random_text_does_not_loop():
    rng = random.Random(0)
    for _ in range(50):
        assert find_loop([rng.randrange(1000) for _ in range(500)]) is None
