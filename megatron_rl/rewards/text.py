"""Open-ended answer metrics: EMS, BLEU and ROUGE-L, exactly as Med-U1 computes them, in linear time.

- ``normalize`` is the VQA challenge's official answer normalisation (processPunctuation, then
  processDigitArticle) that Med-U1 applies before EMS and ROUGE-L, slips included (see below).
- ``ems``: 100 x (distinct reference words present in the candidate) / (candidate tokens).
- ``bleu``: the mean of 1-, 2- and 3-gram-only sentence BLEU (nltk's ``sentence_bleu`` with
  ``SmoothingFunction().method1``) on whitespace tokens of the raw texts, each rounded to 4
  decimals; 0-1 scale. Computed here without nltk's per-call overhead; the tests check it
  against nltk bit for bit.
- ``rouge_l``: 100 x the F1 of the longest common subsequence of the normalised tokens, with a
  bit-parallel LCS (Hyyrö 2004) so a 200 kB response costs milliseconds, not seconds.

Reference-side work (tokens, n-gram counts) is cached: GRPO scores n responses per prompt.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple

# --- VQA answer normalisation -------------------------------------------------------------

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official "(\d)(,)(\d)", written to start with its literal "," so the search skips ahead
# to commas instead of trying a digit at every position (12x faster on long texts).
_DIGIT_COMMA_DIGIT = re.compile(r",(?=\d)(?<=\d,)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a mistyped look-behind that
# always holds in front of a ".", so it removes every period not followed by a digit ...
_PERIOD = re.compile(r"\.(?!\d)")
# ... and it is called as sub("", text, re.UNICODE), which passes re.UNICODE (= 32) as the
# count: at most 32 periods are removed. Kept, as Med-U1 scores that way.
_MAX_PERIODS_REMOVED = int(re.UNICODE)
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset(("a", "an", "the"))
# The official contractions table. Its capitalised keys ("Im", "Ive", "Id've", "I'dve") can never
# match lower-cased words and "somebody'd" maps to "somebodyd"; both are kept as they are.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


_REWRITES = {**_CONTRACTIONS, **_NUMBER_WORDS}


def normalize(text: str) -> list[str]:
    """The VQA-normalised, lower-cased tokens of ``text`` (what EMS and ROUGE-L compare).

    Punctuation: a mark is deleted where, in the ORIGINAL text, it touches a space or the text
    holds a digit,digit pattern; otherwise it becomes a space (in a copy, so one mark's test
    never sees another's replacement). Then at most 32 periods not followed by a digit go.
    Then per word: number words none/zero..ten -> digits, articles dropped, contractions
    restored, commas removed (a token left empty disappears).
    """
    present = [mark for mark in _PUNCTUATION if mark in text]
    if present:
        delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
        # Each decision is made on the original text; replacing marks never creates one, so
        # the copy can be edited in place of the original once every decision is taken.
        deleted = [delete_all or mark + " " in text or " " + mark in text for mark in present]
        for mark, delete in zip(present, deleted):
            text = text.replace(mark, "" if delete else " ")
    stripped = _PERIOD.sub("", text, _MAX_PERIODS_REMOVED)
    # The official per-word steps (number word -> digit, drop articles, restore contractions,
    # delete commas) collapse into one lookup: no rewrite produces an article or another key,
    # and every comma is already gone (it is one of the punctuation marks above).
    return [_REWRITES.get(word, word) for word in stripped.lower().split() if word not in _ARTICLES]


# --- Reference-side statistics, cached per ground truth -----------------------------------


class _GramCounts(NamedTuple):
    """One order's reference n-grams, split by count: most occur once, and a gram that occurs
    once contributes exactly 1 to BLEU's clipped matches wherever the candidate has it."""

    once: frozenset
    repeated: dict  # gram -> count (>= 2)


class _Reference(NamedTuple):
    num_words: int  # whitespace tokens of the raw reference (BLEU's reference length)
    grams: tuple[_GramCounts, _GramCounts, _GramCounts]  # BLEU: 1-, 2-, 3-grams of raw tokens
    normalized: tuple[str, ...]  # VQA-normalised tokens (EMS, ROUGE-L)
    normalized_set: frozenset[str]


def _gram_counts(grams: Iterable) -> _GramCounts:
    counts = Counter(grams)
    return _GramCounts(frozenset(g for g, c in counts.items() if c == 1), {g: c for g, c in counts.items() if c > 1})


@lru_cache(maxsize=4096)
def _reference(text: str) -> _Reference:
    words = text.split()
    grams = (_gram_counts(words), _gram_counts(zip(words, words[1:])), _gram_counts(zip(words, words[1:], words[2:])))
    normalized = tuple(normalize(text))
    return _Reference(len(words), grams, normalized, frozenset(normalized))


# --- Metrics ------------------------------------------------------------------------------


def ems(candidate: str, reference: str) -> float:
    """Exact-match score, 0-100: distinct reference words found in the candidate over ALL
    candidate tokens (repeats count). An empty candidate scores 0."""
    return _ems(normalize(candidate), _reference(reference))


def _ems(candidate_tokens: list[str], reference: _Reference) -> float:
    if not candidate_tokens:
        return 0.0
    found = len(reference.normalized_set.intersection(candidate_tokens))
    return 100 * (found / len(candidate_tokens))


def bleu(reference: str, candidate: str) -> float:
    """Mean of the 1-, 2- and 3-gram-only sentence BLEU scores, each rounded to 4 decimals (0-1).

    Bit-identical to averaging nltk ``sentence_bleu([ref.split()], cand.split(), weights=w,
    smoothing_function=SmoothingFunction().method1)`` over w = (1,0,0,0), (0,1,0,0), (0,0,1,0)
    and rounding each: same brevity penalty, same clipped counts, same epsilon 0.1 smoothing
    of a zero count, same float operations (``bp * exp(log(p))``).
    """
    ref = _reference(reference)
    words = candidate.split()
    num_words = len(words)
    penalty = _brevity_penalty(ref.num_words, num_words)
    scores = []
    for order, ref_grams in enumerate(ref.grams, start=1):
        hyp_grams = words if order == 1 else zip(*(words[i:] for i in range(order)))
        matches = _clipped_matches(hyp_grams, ref_grams)
        if order == 1 and matches == 0:
            return 0.0  # nltk returns 0 for every order when no unigram matches
        total = max(1, num_words - order + 1)
        precision = matches / total if matches else 0.1 / total
        scores.append(round(penalty * math.exp(math.log(precision)), 4))
    return float((scores[0] + scores[1] + scores[2]) / 3)


def _clipped_matches(hyp_grams: Iterable, ref: _GramCounts) -> int:
    """Sum over n-grams of min(count in the candidate, count in the reference)."""
    if not ref.repeated:  # every reference gram occurs once: presence is all that counts
        return len(ref.once.intersection(hyp_grams))
    counts = Counter(hyp_grams)
    matches = len(ref.once.intersection(counts))
    for gram, ref_count in ref.repeated.items():
        hyp_count = counts.get(gram)
        if hyp_count:
            matches += min(hyp_count, ref_count)
    return matches


def _brevity_penalty(ref_len: int, hyp_len: int) -> float:
    if hyp_len > ref_len:
        return 1
    if hyp_len == 0:
        return 0
    return math.exp(1 - ref_len / hyp_len)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) of the VQA-normalised tokens, 0-100; 0 if either side is empty."""
    return _rouge_l(normalize(candidate), _reference(reference))


def _rouge_l(candidate_tokens: list[str], reference: _Reference) -> float:
    m, n = len(candidate_tokens), len(reference.normalized)
    if m == 0 or n == 0:
        return 0
    lcs = lcs_length(candidate_tokens, reference.normalized)
    precision = lcs / m
    recall = lcs / n
    if precision + recall == 0:
        return 0
    beta = 1.0
    f1 = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return 100 * f1


def lcs_length(a: list[str] | tuple[str, ...], b: list[str] | tuple[str, ...]) -> int:
    """Length of the longest common subsequence of two token sequences, bit-parallel.

    Hyyrö's algorithm: one big integer ``v`` holds a bit per position of the longer sequence;
    each token of the shorter one updates it with one add, one subtract and three bit ops, so
    the cost is O(len(short) * len(long) / 64) machine words instead of a Python-level DP table.
    """
    if len(a) < len(b):
        a, b = b, a
    n = len(a)
    if n == 0 or not b:
        return 0
    wanted = set(b)
    positions: dict[str, list[int]] = {}
    for i, token in enumerate(a):
        if token in wanted:
            positions.setdefault(token, []).append(i)
    masks = {token: _bitmask(n, where) for token, where in positions.items()}
    full = (1 << n) - 1
    v = full
    for token in b:
        mask = masks.get(token)
        if mask is None:
            continue
        u = v & mask
        v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def _bitmask(size: int, positions: list[int]) -> int:
    """An int with the given bit positions set, built in O(size) instead of O(len * size)."""
    digits = bytearray(b"0" * size)
    for i in positions:
        digits[size - 1 - i] = 0x31  # "1"; the most significant digit comes first
    return int(digits, 2)

