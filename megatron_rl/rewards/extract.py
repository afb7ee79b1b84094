"""Reading the answer and checking the format of a response, in linear time on any input.

Med-U1 finds answers with ``re.finditer(r"<answer>(.*?)</answer>", text, re.DOTALL)``, which
rescans to the end of the text from every unclosed ``<answer>``: quadratic on a response of
many open tags. ``tagged_answer`` returns the same last match with a fixed number of string
searches.
"""

from __future__ import annotations

import re
from itertools import islice

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
FORMAT_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_FORMAT_SEQUENCE = list(FORMAT_TAGS)
_FORMAT_TAG = re.compile("|".join(re.escape(tag) for tag in FORMAT_TAGS))

_LENIENT_SCAN_CHARS = 200
_DECORATION = " \t\r\n\f\v*_(["
OPTION_LETTERS = frozenset("ABCDEFGHIJKLMN")
"""The letters a multiple-choice ground truth may be (MMLU-Pro has up to 10 options; A-N as Med-U1)."""
# "Option", "Answer", "The correct answer is", "Final choice": each \s+ is followed by a
# literal word, so matching is linear (no two quantifiers compete for the same spaces).
_CHOICE_PREFIX = re.compile(r"(?:the\s+)?(?:correct\s+|final\s+)?(?:option|answer|choice)(?:\s+is)?", re.IGNORECASE)


def as_text(value: object) -> str:
    """The text to score: bytes are decoded (invalid UTF-8 replaced); None and non-text give ''."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return ""


def tagged_answer(response: str) -> str | None:
    """The last ``<answer>...</answer>`` content, stripped; None if absent or empty.

    Same result as the last match of ``re.finditer(r"<answer>(.*?)</answer>", text, re.DOTALL)``
    (Med-U1's extraction), found with at most six string searches instead of a scan per match:

    - the last match ends at the first closing tag after ``last_open``, the last opening tag
      that has a closing tag after it (no match can start later);
    - it starts at the first opening tag after ``before``, the last closing tag before
      ``last_open``: the scan has consumed everything up to there, and an opening tag between
      ``before`` and ``last_open`` is inside this same match (its text may hold "<answer>").

    Tags cannot overlap one another ("<" opens each), which is what makes the shortcut exact.
    """
    last_close = response.rfind(ANSWER_CLOSE)
    if last_close < 0:
        return None
    last_open = response.rfind(ANSWER_OPEN, 0, last_close)
    if last_open < 0:
        return None
    start = response.find(ANSWER_OPEN)  # no match starts earlier
    before = response.rfind(ANSWER_CLOSE, start, last_open)
    if before >= 0:
        start = response.find(ANSWER_OPEN, before + len(ANSWER_CLOSE))
    end = response.find(ANSWER_CLOSE, last_open + len(ANSWER_OPEN))
    return response[start + len(ANSWER_OPEN) : end].strip() or None


def boxed_answer(response: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` with balanced braces, stripped; None if absent."""
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for i in range(begin - 1, len(response)):
        char = response[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return response[begin:i].strip() or None
    return None


def has_think_answer_format(response: str) -> bool:
    """True iff <think>, </think>, <answer>, </answer> each occur exactly once, in that order.

    One scan lists every occurrence of the four tags in text order (they cannot overlap one
    another); the format holds iff that list is exactly the four tags once each, in order.
    """
    first_five = [match.group() for match in islice(_FORMAT_TAG.finditer(response), 5)]
    return first_five == _FORMAT_SEQUENCE


def lenient_choice(answer: str) -> str:
    """The option letter in forms like '(C)', 'C.', 'C: text', '[C]', '**C**', 'Option C',
    'The answer is C'; the answer itself if no letter leads it. Reads the first 200 characters."""
    rest = answer[:_LENIENT_SCAN_CHARS].lstrip(_DECORATION)
    prefix = _CHOICE_PREFIX.match(rest)
    if prefix:
        rest = rest[prefix.end() :].lstrip(_DECORATION + ":-")
    if rest and rest[0] in OPTION_LETTERS and (len(rest) == 1 or not rest[1].isalnum()):
        return rest[0]
    return answer
