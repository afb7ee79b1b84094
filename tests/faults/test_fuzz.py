"""Fuzzing the readers of data and the reward modules with generated bad input (hypothesis).

- 10,000 generated dataset rows, written to parquet files whose columns have generated types
  (missing, null, numbers for text, lists, structs, wrong chat-message shapes, huge and unicode
  text), read by ``PromptDataset``: each row loads, or is refused with ``RowError`` naming the file,
  the row and the field; ``skip_bad_rows`` leaves out exactly the refused rows and reports them.
- 10,000 generated raw records (JSONL) read by ``prepare-data``'s readers: each becomes a row the
  dataset accepts, or is refused with an error naming the file and the record.
- 10,000 generated responses (tags, numbers, nested tags, control characters, odd unicode, bytes,
  up to 1 M characters) scored against generated ground truths and limits, and 1,000 more against
  the real Med-U1 ones: every call gives finite parts in their documented ranges within a second of
  CPU time.

Seeds are fixed (``derandomize``) and no example database is kept, so every run checks the same
inputs; shrinking is off (it can take minutes), and a failure prints the blob that reproduces it.
Each test counts what it checked and asserts the count; ``pytest`` prints the counts at the end.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from megatron_rl.data.dataset import PromptDataset
from megatron_rl.data.prepare import READERS, PrepareOptions, detect_format, load_records, prepare
from megatron_rl.data.schema import (
    ARROW_SCHEMA,
    ROLES,
    TEMPLATE_MARKERS,
    PromptRow,
    RowError,
    read_rows,
    row_from_record,
)
from megatron_rl.rewards import TASK_OF_SOURCE, score, score_batch
from megatron_rl.rewards.score import CHOICE, NUMERIC, OPEN_ENDED
from megatron_rl.testing import build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rewards"))
from test_robustness import _TAGGED, CONFIGS, well_defined

TARGET = 10_000
ROWS_PER_FILE = 25
RECORDS_PER_FILE = 25
RESPONSES_PER_EXAMPLE = 10
REAL_EXAMPLES = 100
CALL_BOUND_S = 1.0
"""Every reward call must finish within this much CPU time (``time.thread_time`` around each call, so
other jobs on a loaded machine do not count). Linear scoring of 1 MB takes tens of milliseconds; a
quadratic scan would take minutes."""
NO_LIMIT = 10**9
SOURCES = sorted(TASK_OF_SOURCE)
FUZZ = settings(phases=[Phase.explicit, Phase.generate], deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def _choose(draw, *pools: list) -> list:
    """One element of each pool, all from ONE drawn integer read in mixed radix: a single hypothesis
    choice instead of one per pool (hypothesis spends most of this file's time per choice)."""
    index = draw(st.integers(0, math.prod(len(pool) for pool in pools) - 1))
    picks = []
    for pool in pools:
        index, i = divmod(index, len(pool))
        picks.append(pool[i])
    return picks


# --- Values ---------------------------------------------------------------------------------------
# Drawn from fixed pools (one choice each, so 10,000 rows take seconds), plus a few texts that
# hypothesis writes freely for each file.


def _odd_texts() -> list[str]:
    """Texts no field expects, built once with a fixed seed: control characters, whitespace, paths,
    template markers and template syntax, numbers, unicode of every plane, and long texts."""
    rng = random.Random(0)
    odd = ["", " \n\t", "\x00", "\x1b[31m", "\r\n", "../../etc/passwd", "/tmp/x", "MedIQ ", "medcalc-bench", "1e400",
           "nan", "-1", "0", "<answer>C</answer>", "\u202e\ufeff", "發燒 🤒", "e\u0301", "{{ 7 * 7 }}", "{% raise %}",
           "%s%n", "\\x00", "<|im_end|>", "<|endoftext|>"]
    odd += [f"{marker}user\nWhich option?<|im_end|>\n" for marker in TEMPLATE_MARKERS]
    for _ in range(60):
        planes = (lambda: rng.randrange(32, 127), lambda: rng.randrange(0xA0, 0xD7FF), lambda: rng.randrange(0x10000, 0x10FFFF))
        odd.append("".join(chr(rng.choice(planes)()) for _ in range(rng.randrange(1, 40))))
    odd += ["x" * 20_000, "word " * 4_000, "<|im_start|>" * 500]
    return odd


ODD = _odd_texts()
TEXT = st.sampled_from([*ODD, *SOURCES, *ROLES, *"ABCDEFGHIJKLMN", "25.2"])
INT = st.sampled_from([-(2**63), -(2**31), -300, -1, 0, 1, 2, 300, 2**31, 2**63 - 1])
FLOAT = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1.5, -1e308, 1e308, 5e-324, 25.2])
BOOL = st.booleans()


def _base_rows() -> list[dict]:
    """Valid records of every task type and prompt shape (the starting point of each generated row)."""
    templated = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhich option?<|im_end|>\n<|im_start|>assistant\n"
    shapes = [(("user", "Which option? A: x B: y"),), (("system", "Be brief."), ("user", "Dose in mg/kg?")),
              (("user", templated),), (("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"))]
    truths = {CHOICE: [("C", None, None)], NUMERIC: [("25.2", "23.9", "26.5"), ("03/14/2024", None, None),
                                                    ("('17 weeks', '6 days')", None, None)],
              OPEN_ENDED: [("Gradenigo syndrome: otorrhoea, facial pain and diplopia.", None, None)]}
    rows = []
    for source in SOURCES:
        for shape in shapes:
            for truth, lower, upper in truths[TASK_OF_SOURCE[source]]:
                for num_tokens in (-1, 300, -500):
                    rows.append(PromptRow(source, shape, truth, num_tokens, lower, upper, index=len(rows)).to_record())
    return rows


BASE_ROWS = _base_rows()
MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])
STANDARD_TYPES = {field.name: field.type for field in ARROW_SCHEMA}
RETYPED = {  # column -> other column types, each with its values
    "data_source": [(pa.int64(), INT), (pa.list_(pa.string()), st.lists(TEXT, max_size=2)), (pa.null(), st.none())],
    "prompt": [(pa.string(), TEXT), (pa.list_(pa.string()), st.lists(TEXT, max_size=2)),
               (pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())])),
                st.lists(st.fixed_dictionaries({"role": TEXT, "content": INT}), max_size=2)),
               (pa.list_(pa.struct([("content", pa.string())])), st.lists(st.fixed_dictionaries({"content": TEXT}),
                                                                          max_size=2)),
               (pa.list_(pa.list_(pa.string())), st.lists(st.lists(TEXT, max_size=2), max_size=2))],
    "reward_model": [(pa.string(), TEXT),
                     (pa.struct([("ground_truth", pa.float64()), ("num_tokens", pa.float64())]),
                      st.fixed_dictionaries({"ground_truth": FLOAT, "num_tokens": FLOAT})),
                     (pa.struct([("ground_truth", pa.int64()), ("num_tokens", pa.string())]),
                      st.fixed_dictionaries({"ground_truth": INT, "num_tokens": TEXT})),
                     (pa.struct([("ground_truth", pa.list_(pa.string())), ("lower_limit", pa.list_(pa.float64())),
                                 ("num_tokens", pa.bool_())]),
                      st.fixed_dictionaries({"ground_truth": st.lists(TEXT, max_size=2),
                                             "lower_limit": st.lists(FLOAT, max_size=2), "num_tokens": BOOL})),
                     (pa.struct([("ground_truth", pa.string()), ("lower_limit", pa.float64()), ("upper_limit", pa.int64())]),
                      st.fixed_dictionaries({"ground_truth": TEXT, "lower_limit": FLOAT, "upper_limit": INT}))],
    "extra_info": [(pa.string(), TEXT), (pa.struct([("index", pa.string()), ("split", pa.int64())]),
                                        st.fixed_dictionaries({"index": TEXT, "split": INT})),
                   (pa.struct([("index", pa.float64())]), st.fixed_dictionaries({"index": FLOAT}))],
    "ability": [(pa.int64(), INT)],
}
REMOVABLE = ["data_source", "prompt", "reward_model", "extra_info", "ability"]


def _mutations(free: list[str]) -> list[tuple[tuple, list]]:
    """(path in a standard record, values of the path's own type) for one file; ``free``: drawn texts."""
    text = [*ODD, *free, None]
    messages = [None, [], [{"role": None, "content": "q"}], [{"role": "user", "content": ""}],
                [{"role": "tool", "content": "q"}], [{"role": "USER", "content": "q"}],
                [{"role": "user", "content": "q"}] * 3 + [{"role": "system", "content": "s"}],
                *([{"role": "user", "content": t}] for t in text)]
    return [
        (("data_source",), text), (("prompt",), messages), (("prompt", 0, "content"), text),
        (("prompt", 0, "role"), text), (("prompt", -1, "content"), text), (("prompt", -1), [None]),
        (("reward_model",), [None]), (("reward_model", "ground_truth"), text),
        (("reward_model", "num_tokens"), [None, -(2**63), -300, -1, 0, 1, 2**63 - 1]),
        (("reward_model", "lower_limit"), text), (("reward_model", "upper_limit"), text), (("extra_info",), [None]),
        (("extra_info", "index"), [None, -(2**63), -1, 0, 2**63 - 1]), (("ability",), text),
    ]


def _mutate(record: dict, path: tuple, value: object) -> None:
    """Set ``record[path[0]][path[1]]... = value`` where that place exists."""
    *parents, last = path
    target = record
    for key in parents:
        target = target.get(key) if isinstance(target, dict) else (target[key] if isinstance(target, list) and target else None)
    if isinstance(target, dict) and last in target or isinstance(target, list) and target:
        target[last] = value


@st.composite
def parquet_files(draw) -> pa.Table:
    """One file of ROWS_PER_FILE rows: the project's column types, up to two columns retyped or removed;
    each row a valid record with up to three of its values replaced."""
    types, retyped = dict(STANDARD_TYPES), {}
    if draw(st.integers(0, 2)) == 0:
        for column in draw(st.lists(st.sampled_from(REMOVABLE), min_size=1, max_size=2, unique=True)):
            choices = RETYPED[column]
            pick = draw(st.integers(0, len(choices)))  # len(choices): remove the column
            types.pop(column)
            if pick < len(choices):
                types[column], retyped[column] = choices[pick]
    free = draw(st.lists(st.text(max_size=12), min_size=2, max_size=2))  # any unicode, control characters included
    mutations = _mutations(free)
    longest = max(len(values) for _, values in mutations)
    rows = []
    for _ in range(ROWS_PER_FILE):
        base, num_mutations = _choose(draw, BASE_ROWS, [0, 0, 0, 1, 1, 2, 3])
        record = copy.deepcopy(base)
        for _ in range(num_mutations):
            (path, values), which = _choose(draw, mutations, range(longest))
            _mutate(record, path, values[which % len(values)])
        record = {column: record.get(column) for column in types}
        record.update({column: draw(values) for column, values in retyped.items()})
        rows.append(record)
    return pa.Table.from_pylist(rows, schema=pa.schema(list(types.items())))


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny Qwen2 tokenizer (ChatML template; no Llama 3 special tokens)."""
    return build_tokenizer()


def test_dataset_rows_load_or_are_refused_by_name(tmp_path: Path, tokenizer, fuzz_tally) -> None:
    count = {"rows": 0, "loaded": 0, "refused": 0, "files refused": 0}

    @settings(FUZZ, max_examples=TARGET // ROWS_PER_FILE + 20)
    @given(table=parquet_files())
    def check(table: pa.Table) -> None:
        path = tmp_path / f"fuzz_{count['rows'] // ROWS_PER_FILE}.parquet"
        pq.write_table(table, path)
        count["rows"] += table.num_rows
        try:
            dataset = PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT, skip_bad_rows=True)
        except RowError as err:
            raise AssertionError(f"skip_bad_rows let a RowError through: {err}") from err
        except ValueError as err:  # a file-level fault: a missing column
            assert str(path) in str(err) and "missing column" in str(err), err
            assert {"data_source", "prompt", "reward_model"} - set(table.column_names), err
            count["files refused"] += 1
            return
        # Nothing is lost silently: every row is kept or reported with the field at fault.
        assert len(dataset) + len(dataset.skipped) == table.num_rows
        assert [e.row_index for e in dataset.examples] == sorted(set(range(table.num_rows)) - {
            s.row for s in dataset.skipped})
        assert all(s.file == str(path) and "=" in s.reason for s in dataset.skipped), dataset.skipped[:3]
        count["loaded"] += len(dataset)
        count["refused"] += len(dataset.skipped)
        # Without skip_bad_rows the first bad row stops the read, naming the file and that row.
        if dataset.skipped:
            with pytest.raises(RowError) as raised:
                PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)
            first = dataset.skipped[0]
            assert str(raised.value) == f"{path}: row {first.row}: {first.reason}"

    check()
    fuzz_tally.update({f"dataset {k}": v for k, v in count.items()})
    assert count["rows"] >= TARGET
    assert count["loaded"] > 0 and count["refused"] > 0, count  # both outcomes were exercised


def test_fuzz_findings_on_rows_stay_fixed(tmp_path: Path, tokenizer) -> None:
    """Rows the fuzzing above found crashing the reader, now refused by name."""
    good = BASE_ROWS[0]
    path = tmp_path / "found.parquet"
    # A list as data_source (a parquet list column) raised TypeError: unhashable type.
    with pytest.raises(RowError, match=r"row 0: data_source=\['MedIQ'\] is not a known data_source"):
        row_from_record({**good, "data_source": ["MedIQ"]}, where=f"{path}: row 0")
    # A prompt templated for Llama 3 stopped the whole dataset with an error naming no file or row,
    # even with skip_bad_rows.
    llama = {**good, "prompt": [{"role": "user", "content": "<|start_header_id|>user<|end_header_id|>\n\nWhich?"}]}
    pq.write_table(pa.Table.from_pylist([good, llama, good], schema=ARROW_SCHEMA), path)
    with pytest.raises(RowError, match=rf"^{re.escape(str(path))}: row 1: prompt\[0\]\.content=.*'<\|start_header_id\|>'"):
        PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)
    dataset = PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT, skip_bad_rows=True)
    assert [e.row_index for e in dataset.examples] == [0, 2]
    assert [(s.row, s.reason.split("=")[0]) for s in dataset.skipped] == [(1, "prompt[0].content")]


def test_fuzz_findings_on_raw_records_stay_fixed(tmp_path: Path) -> None:
    """Raw records the fuzzing above found crashing prepare-data, now refused by name."""
    where = "raw.jsonl: record 0"
    assert detect_format({"Source": {"A": 1}, "question": "q"}) is None  # was TypeError: unhashable type
    with pytest.raises(ValueError, match=r"record 0: field 'context'=\[1\] must be a string or a list of strings"):
        READERS["mediq"]({"context": [1], "question": "q", "options": {"A": "x"}, "answer_idx": "A"}, where)
    with pytest.raises(ValueError, match=r"record 0: field 'Lower Limit'=\{\} must be a string or a number"):
        READERS["medcalc"]({"problem": "q", "answer": "1", "Lower Limit": {}}, where)
    # JSON's "\ud800" escape decodes to a lone surrogate: writing the parquet raised UnicodeEncodeError.
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps({"question": "Which \ud800?", "options": ["a", "b"], "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: record 0: field 'question'=.*lone surrogate"):
        prepare([path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- Raw records (prepare-data) ------------------------------------------------------------------

BASE_RAW = [  # one valid record of each layout prepare-data reads
    {"problem": "BMI?", "answer": "25.2", "Lower Limit": "23.9", "Upper Limit": "26.5"},
    {"Patient Note": "75 kg.", "Question": "BMI?", "Ground Truth Answer": "38", "Lower Limit": 36.1, "Upper Limit": 39.9},
    {"problem": "Which?", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "C"},
    {"context": ["Fever.", "Rash."], "question": "Which?", "options": {"A": "x", "B": "y"}, "answer_idx": "B"},
    {"problem": "Which?", "choices": ["x", "y", "z"], "answer": "B"},
    {"question": "Which?", "options": {"A": "x", "B": "y"}, "label": "A"},
    {"problem": "Why?", "answer": "<answer>\nBecause.\n</answer>\n", "Source": "medical-o1-reasoning-SFT"},
    {"Question": "Why?", "Complex_CoT": "Think.", "Response": "Because."},
    {"note_1": "Admitted.", "question": "Which?", "choice_A": "x", "choice_B": "y", "answer": "A"},
    {"question": "Which?", "options": ["a", "b", "c"], "answer": "C", "split": "test"},
]
RAW_KEYS = sorted({key for record in BASE_RAW for key in record} | {"options", "answer_idx", "Source", "split"})
JSON_VALUES = [None, True, False, 0, -1, 2**63, 1e308, math.nan, math.inf, "\ud800", *ODD[:40], *"ABCDEFGHIJKLMNZ",
               [], ["A"], [1, None], [f"option {i}" for i in range(20)], [{"A": "x"}], [[["x"]]], {}, {"A": "x", "B": None},
               {"Z": "x"}, {"A": 1}, {"data": []}, {"A": {"B": "x"}}, *SOURCES]


@st.composite
def raw_records(draw) -> list[dict]:
    """RECORDS_PER_FILE records: valid ones of each layout with up to three fields replaced or removed."""
    free = draw(st.lists(st.text(max_size=12), min_size=2, max_size=2))  # any unicode, control characters included
    keys, values = st.sampled_from([*RAW_KEYS, *free]), st.sampled_from([*JSON_VALUES, *free])
    num_mutations = st.sampled_from([0, 0, 1, 1, 2, 3])
    records = []
    for _ in range(RECORDS_PER_FILE):
        record = copy.deepcopy(draw(st.sampled_from(BASE_RAW)))
        for _ in range(draw(num_mutations)):
            key, value = draw(keys), draw(values)
            if value == "\ud800" and key in record:
                del record[key]  # the lone surrogate stands for "remove this field" too
            else:
                record[key] = value
        records.append(record)
    return records


def test_raw_records_become_valid_rows_or_are_refused_by_name(tmp_path: Path, fuzz_tally) -> None:
    count = {"records": 0, "read": 0, "refused": 0}

    @settings(FUZZ, max_examples=TARGET // RECORDS_PER_FILE + 20)
    @given(records=raw_records(), fallback=st.sampled_from(sorted(READERS)))
    def check(records: list[dict], fallback: str) -> None:
        number = count["records"] // RECORDS_PER_FILE
        path = tmp_path / f"raw_{number}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        count["records"] += len(records)
        try:
            loaded = load_records(path)
        except ValueError as err:  # text that is not UTF-8 (a lone surrogate): the file is refused
            assert str(err).startswith(f"{path}: record ") and "surrogate" in str(err), err
            count["refused"] += len(records)
            return
        assert len(loaded) == len(records)
        for index, record in enumerate(loaded):
            where = f"{path}: record {index}"
            try:
                problem = READERS[detect_format(record) or fallback](record, where)
            except ValueError as err:
                assert str(err).startswith(where + ":"), err
                count["refused"] += 1
                continue
            # A problem prepare-data accepts becomes a row the dataset accepts.
            row = problem.to_row(-1, "train", index, "system prompt")
            assert row_from_record(row.to_record(), where=where) == row
            count["read"] += 1
        # The whole file through prepare-data: written rows read back, or one error naming the file.
        out = tmp_path / f"out_{number}"
        try:
            summary = prepare([path], out, PrepareOptions(format_name=fallback))
        except ValueError as err:
            assert str(path) in str(err), err
            assert not out.exists() or not any(out.iterdir())
            return
        for file_name in summary.written:
            read_rows(out / file_name)

    check()
    fuzz_tally.update({f"raw {k}": v for k, v in count.items()})
    assert count["records"] >= TARGET
    assert count["read"] > 0 and count["refused"] > 0, count


# --- Responses -------------------------------------------------------------------------------------

NUMBERS = ["25.2", "-3", "1e308", "1e309", "-0", "+5", "25.", ".5", "1_000", "0x10", "١٢٣", "½", "NaN", "inf", "-inf",
           "03/14/2024", "('17 weeks', '6 days')", str(10**30), "5e-324"]
PIECES = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}", "{", "<", ">", "</", "<answer", "answer>",
          "(C)", "C.", "Option C", "**C**", "The answer is ", " ", "\n", "\x00", "\x1b", "\r", "Gradenigo syndrome",
          "otorrhoea, facial pain and diplopia.", *"ABCDEFGHIJKLMN", *NUMBERS, *ODD]
MAX_RESPONSE_CHARS = 1 << 20
TRUTHS = [*"ABCDEFGHIJKLMNZ", *NUMBERS, *ODD[:40], None, 7, 25.2, math.nan, "Gradenigo syndrome: otorrhoea, facial pain."]
LIMITS = [None, "", "23.9", "26.5", "nan", "inf", "-inf", "x", 23.9, math.nan, math.inf, 26, True, "1e309"]


OTHER_RESPONSES = [None, 0, 3.5, ["<answer>C</answer>"], b"\xff\xfe<answer>C</answer>"]
ROW_FIELDS = {"data_source": SOURCES, "ground_truth": TRUTHS, "lower_limit": LIMITS, "upper_limit": LIMITS,
              "num_tokens": [-1, -1, 0, 300, -300, 5000], "response_num_tokens": [0, 1, 299, 300, 10**6],
              "config": CONFIGS}


@st.composite
def reward_rows(draw) -> list[dict]:
    """RESPONSES_PER_EXAMPLE rows of ``score`` arguments: responses glued from tags, numbers, letters,
    control characters and odd unicode (a few repeated up to 1 MB), non-text responses, and any
    ground truth and limits."""
    free = draw(st.text(max_size=20))  # any unicode, control characters included
    pieces = [*PIECES, free]
    rows = []
    for _ in range(RESPONSES_PER_EXAMPLE):
        count, repeat, kind, other = _choose(draw, range(9), [1] * 40 + [2, 100, 5_000, MAX_RESPONSE_CHARS],
                                             ["text"] * 8 + ["bytes", "other"], OTHER_RESPONSES)
        text = "".join(_choose(draw, *[pieces] * count)) if count else ""
        text *= min(repeat, MAX_RESPONSE_CHARS // max(1, len(text)))
        response = {"text": text, "bytes": text.encode("utf-8", "surrogatepass"), "other": other}[kind]
        fields = dict(zip(ROW_FIELDS, _choose(draw, *[[*pool, free] if name == "ground_truth" else pool
                                                      for name, pool in ROW_FIELDS.items()]), strict=True))
        rows.append({**fields, "response": response})
    return rows


def _check_call(fuzz_tally, row: dict) -> float:
    """Score one row as ``score_batch`` would, timed; the result must be well defined in the bound."""
    start, start_wall = time.thread_time(), time.perf_counter()
    result = score(row["data_source"], row["response"], row["ground_truth"], lower_limit=row["lower_limit"],
                   upper_limit=row["upper_limit"], num_tokens=row["num_tokens"],
                   response_num_tokens=row["response_num_tokens"], config=row["config"])
    elapsed, wall = time.thread_time() - start, time.perf_counter() - start_wall
    if isinstance(row["response"], (str, bytes)):
        fuzz_tally["reward longest response (chars or bytes)"] = max(fuzz_tally["reward longest response (chars or bytes)"],
                                                            len(row["response"]))
    assert well_defined(result), (row, result)
    config = row["config"]
    assert -2.0 <= result.correctness <= 1.0, result  # -2: no answer; open-ended continuous: metric / 100
    if config.length_formula == "medu1":
        assert -1.0 <= result.length <= 1.0, result
    else:  # LCPO: -alpha |N - n| (exact) or a share of a correct answer's value (max)
        assert -config.l1_alpha * (abs(row["num_tokens"]) + row["response_num_tokens"]) - 1 <= result.length <= 0
    assert elapsed < CALL_BOUND_S, (elapsed, {k: str(v)[:80] for k, v in row.items()})
    fuzz_tally["reward max CPU seconds per call"] = max(fuzz_tally["reward max CPU seconds per call"], elapsed)
    fuzz_tally["reward max wall seconds per call"] = max(fuzz_tally["reward max wall seconds per call"], wall)
    return result.total


def _check_rows(fuzz_tally, rows: list[dict], count: dict) -> None:
    totals = [_check_call(fuzz_tally, row) for row in rows]
    count["responses"] += len(rows)
    for config in {id(r["config"]): r["config"] for r in rows}.values():  # score_batch agrees with score
        mine = [(i, r) for i, r in enumerate(rows) if r["config"] is config]
        batch = score_batch([{k: v for k, v in r.items() if k != "config"} for _, r in mine], config=config)
        assert [b.total for b in batch] == [totals[i] for i, _ in mine]


def test_generated_responses_get_a_bounded_score_in_time(fuzz_tally) -> None:
    count = {"responses": 0}

    @settings(FUZZ, max_examples=TARGET // RESPONSES_PER_EXAMPLE + 20)
    @given(rows=reward_rows())
    def check(rows: list[dict]) -> None:
        _check_rows(fuzz_tally, rows, count)

    check()
    fuzz_tally["reward responses (generated truths)"] += count["responses"]
    assert count["responses"] >= TARGET


def _real_truths(medu1_dir: Path) -> list[dict]:
    truths = []
    for name in ("mediq", "medxpertqa", "medcalc", "huatuo"):
        table = pq.read_table(medu1_dir / f"{name}.parquet", columns=["data_source", "reward_model"])
        for record in table.to_pylist():
            reward = record["reward_model"]
            truths.append({"data_source": record["data_source"], "ground_truth": reward["ground_truth"],
                           "lower_limit": reward.get("lower_limit"), "upper_limit": reward.get("upper_limit")})
    return truths


def test_generated_responses_against_real_ground_truths(medu1_dir: Path, fuzz_tally) -> None:
    """The Med-U1 files' own ground truths and limits (skipped, with the reason, where they are absent)."""
    truths = _real_truths(medu1_dir)
    count = {"responses": 0}
    real_row = st.builds(lambda truth, response, near, config, num_tokens, used: {
        **truth, "config": config, "num_tokens": num_tokens, "response_num_tokens": used,
        "response": response if near is None else f"<think>x</think><answer>{truth['ground_truth']}{near}</answer>"},
        # _TAGGED (tests/rewards/test_robustness.py): text mixed with the four tags and \\boxed{
        st.sampled_from(truths), _TAGGED, st.one_of(st.none(), st.sampled_from(["", " ", ".0", "0", "\x00", " kg"])),
        st.sampled_from(CONFIGS), st.one_of(st.just(-1), st.integers(-5000, 5000)), st.integers(0, 10**6))

    @settings(FUZZ, max_examples=REAL_EXAMPLES)
    @given(rows=st.lists(real_row, min_size=RESPONSES_PER_EXAMPLE, max_size=RESPONSES_PER_EXAMPLE))
    def check(rows: list[dict]) -> None:
        _check_rows(fuzz_tally, rows, count)

    check()
    fuzz_tally["reward responses (Med-U1 truths)"] += count["responses"]
    assert count["responses"] >= REAL_EXAMPLES * RESPONSES_PER_EXAMPLE
