"""EMS, BLEU and ROUGE-L: hand-checked numbers, and nltk as the oracle for BLEU."""

from __future__ import annotations

import math
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from megatron_rl.rewards import text


def nltk_bleu(reference: str, candidate: str) -> float:
    """The Med-U1 definition, straight through nltk."""
    smoothing = SmoothingFunction().method1
    weights = [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)]
    scores = [round(sentence_bleu([reference.split()], candidate.split(), weights=w, smoothing_function=smoothing), 4)
              for w in weights]
    return float((scores[0] + scores[1] + scores[2]) / 3)


def dp_lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        # ", " touches a space -> the comma is deleted; final "." removed; "the" dropped;
        # number words -> digits.
        ("Two tablets, the first one.", ["2", "tablets", "first", "1"]),
        # "/" touches no space -> becomes a space.
        ("10 mg/kg daily", ["10", "mg", "kg", "daily"]),
        # A digit,digit anywhere -> every mark is deleted, not spaced: "mg/kg" -> "mgkg".
        ("1,000 mg/kg", ["1000", "mgkg"]),
        # A period before a digit stays.
        ("3.5 mg.", ["3.5", "mg"]),
        # The test is made on the original text: " (" exists, so "(" is deleted everywhere,
        # ") " exists, so ")" is deleted everywhere; "a" is an article.
        ("a (b) c(d)", ["b", "cd"]),
        # Contractions restored; the table's capitalised keys never match lower-cased words.
        ("Dont worry Im fine", ["don't", "worry", "im", "fine"]),
        ("", []),
    ],
)
def test_normalize_by_hand(raw: str, tokens: list[str]) -> None:
    assert text.normalize(raw) == tokens


def spec_normalize(raw: str) -> list[str]:
    """The official steps as the VQA script states them, one mark and one word at a time."""
    marks = list(";/[]\"{}()=+\\_-><@`,?!")
    copy = raw
    for mark in marks:
        if mark + " " in raw or " " + mark in raw or re.search(r"(\d)(,)(\d)", raw):
            copy = copy.replace(mark, "")
        else:
            copy = copy.replace(mark, " ")
    copy = re.sub(r"(?!<=\d)(\.)(?!\d)", "", copy, count=32)
    words = []
    for word in copy.lower().split():
        word = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}.get(word, word)
        if word not in ("a", "an", "the"):
            words.append(text._CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "").lower().split()


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(list(";/[]\"{}()=+\\_-><@`,?!.1 aAthe\tI'mdont") + ["one", "The", "x"]),
               max_size=40).map("".join))
def test_normalize_equals_the_official_steps(raw: str) -> None:
    assert text.normalize(raw) == spec_normalize(raw)


def test_normalize_removes_at_most_32_periods() -> None:
    # 40 "x." pairs: the first 32 periods go, the last 8 stay (re.UNICODE passed as count).
    assert text.normalize("x." * 40) == ["x" * 32 + "x." * 8]


def test_ems_by_hand() -> None:
    # Candidate tokens: aspirin, aspirin, heparin (3). Distinct reference words found: aspirin,
    # heparin (2; "and" is absent). EMS = 100 * 2 / 3.
    assert text.ems("aspirin aspirin heparin", "aspirin and heparin") == pytest.approx(200 / 3)
    assert text.ems("", "aspirin") == 0
    assert text.ems("the a an", "aspirin") == 0  # only articles: no tokens left
    assert text.ems("Aspirin.", "aspirin") == 100


def test_bleu_by_hand() -> None:
    # ref "a b c d", hyp "a b": p1 = 2/2, p2 = 1/1, p3 = 0 -> 0.1/1 (method1 epsilon);
    # brevity penalty exp(1 - 4/2) = 0.367879; rounded: 0.3679, 0.3679, 0.0368.
    assert text.bleu("a b c d", "a b") == pytest.approx((0.3679 + 0.3679 + 0.0368) / 3, abs=1e-12)
    assert text.bleu("a b c d", "a b c d") == 1.0
    assert text.bleu("a b c d", "x y") == 0.0  # no unigram match: 0 for every order
    assert text.bleu("a b c d", "") == 0.0


def test_bleu_equals_nltk_on_varied_texts() -> None:
    rng = random.Random(0)
    vocabulary = "fever cough the of and pain nerve otitis media . , 5 mg".split()
    for _ in range(600):
        reference = " ".join(rng.choices(vocabulary, k=rng.randint(0, 25)))
        candidate = " ".join(rng.choices(vocabulary, k=rng.randint(0, 40)))
        assert text.bleu(reference, candidate) == nltk_bleu(reference, candidate), (reference, candidate)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab c\n.", max_size=60), st.text(alphabet="ab c\n.", max_size=60))
def test_bleu_equals_nltk_property(reference: str, candidate: str) -> None:
    assert text.bleu(reference, candidate) == nltk_bleu(reference, candidate)


def test_rouge_l_by_hand() -> None:
    # LCS(p q r s t, p r t u) = 3: P = 3/5, R = 3/4, F1 = 2PR / (P + R) = 0.9 / 1.35 = 2/3.
    assert text.rouge_l("p q r s t", "p r t u") == pytest.approx(200 / 3)
    assert text.rouge_l("", "p") == 0
    assert text.rouge_l("x y", "p q") == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=80), st.lists(st.sampled_from("abcde"), max_size=80))
def test_bit_parallel_lcs_equals_dynamic_programming(a: list[str], b: list[str]) -> None:
    assert text.lcs_length(a, b) == dp_lcs(a, b)


def test_lcs_of_long_sequences() -> None:
    rng = random.Random(1)
    a = rng.choices("abcdefgh", k=700)
    b = rng.choices("abcdefgh", k=90)
    assert text.lcs_length(a, b) == dp_lcs(a, b)


def test_metrics_are_finite_on_huge_text() -> None:
    reference = "persistent ear discharge facial pain and diplopia"
    candidate = ("ear pain " * 20_000) + "diplopia"
    for value in (text.ems(candidate, reference), text.bleu(reference, candidate), text.rouge_l(candidate, reference)):
        assert math.isfinite(value) and value >= 0
