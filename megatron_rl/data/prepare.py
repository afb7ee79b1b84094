"""Raw benchmark files -> training, validation and test parquet in the verl / Med-U1 schema.

    megatron-rl prepare-data --input raw/mediq.json raw/mediq_test.json --output-dir data/

Each input's benchmark is recognised from its content (or ``--format``): the Med-U1 raw
layouts (``Source``, ``problem``, ``options``/``choices``, ``answer``, ``Lower Limit``, ...)
and the public releases of MedCalc-Bench, MediQ, MedXpertQA, medical-o1-reasoning-SFT,
EHRNoteQA and MMLU-Pro. A prompt is a system message plus a user message: the question
(multiple choice: then one ``Letter: text`` line per option), the task's answer instruction
and the length instruction. Chat templates are applied later, once, by the dataset.

Splits come from each input's name as Med-U1 names them (``train_*`` -> train, ``*_test*`` ->
test, otherwise validation), from a ``split`` field in the records, or from ``--split``.
Outputs per benchmark: ``train_<name>.parquet``, ``<name>.parquet`` (validation) and
``<name>_test.parquet``, plus ``train_<mix>.parquet`` mixing every multiple-choice training row.
A question never appears in two splits: duplicates are dropped from the less precious split
(test > validation > train) and counted.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow.parquet as pq

from megatron_rl.data.schema import NO_LENGTH_CONTROL, PromptRow, write_rows
from megatron_rl.paths import check_file_name, safe_child
from megatron_rl.rewards.score import CHOICE, NUMERIC, OPEN_ENDED, TASK_OF_SOURCE
from megatron_rl.validation import check_choice, check_range

SYSTEM_PROMPT = (
    "You are a helpful medical assistant. Please consider the provided question, as if you were a human "
    "pondering deeply. Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', "
    "'oh, I see', 'let's break it down', etc, or other natural language thought expressions. It's encouraged to "
    "include self-reflection or verification in the reasoning process. Provide your detailed reasoning within the "
    "<think> </think> tags and final answer within the <answer> </answer> tags, respectively, i.e., <think> "
    "reasoning process here </think><answer> final answer here </answer>."
)
"""The Med-U1 system prompt."""

TASK_INSTRUCTIONS = {
    CHOICE: "Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    NUMERIC: "Please provide the numerical value (e.g., 42 or 3.14) or specific answer (e.g., 10/25/2020 or "
    "('17 weeks', '6 days')) within the <answer> </answer> tags.",
    OPEN_ENDED: "Please provide your text answer within the <answer> </answer> tags.",
}
"""The answer instruction of each task type (Med-U1's wording)."""

SPLITS = ("train", "validation", "test")
SPLIT_PRIORITY = {"test": 0, "validation": 1, "train": 2}  # a duplicate stays in the lower number
FORMATS = ("medcalc", "mediq", "medxpertqa", "huatuo", "ehrnoteqa", "mmlu_pro")
SOURCE_OF_FORMAT = {
    "medcalc": "MedCalc-Bench",
    "mediq": "MedIQ",
    "medxpertqa": "MedXpertQA",
    "huatuo": "medical-o1-reasoning-SFT",
    "ehrnoteqa": "EHRNoteQA",
    "mmlu_pro": "MMLU-Pro",
}
FORMAT_OF_SOURCE = {source: name for name, source in SOURCE_OF_FORMAT.items()}
LETTERS = "ABCDEFGHIJKLMN"


# --- Length instructions ------------------------------------------------------------------

LENGTH_MODES = ("exact", "normal", "fixed", "log", "both", "both_both")


@dataclass(frozen=True)
class LengthMode:
    """How each row's length budget (``reward_model.num_tokens``) is drawn; Med-U1's flags.

    - ``exact`` (default): "Think for N tokens.", N uniform in [100, 2000];
    - ``normal`` (``--do-normal``): no instruction, num_tokens = -1;
    - ``fixed`` (``--num-tokens N``): N > 0 exact, N < 0 "Think for maximum |N| tokens.";
    - ``log`` (``--use-log``): N = int(2 ** U(8, 14.5)), exact;
    - ``both`` (``--use-both``): half exact N in [100, 2000], half no instruction;
    - ``both_both`` (``--use-both-both``): N in [100, 2000], negated (a maximum) half the time.
    """

    mode: str = "exact"
    num_tokens: int = NO_LENGTH_CONTROL
    """The budget of mode 'fixed' (non-zero; negative = a maximum)."""

    def __post_init__(self) -> None:
        check_choice("length.mode", self.mode, LENGTH_MODES)
        if self.mode == "fixed" and (self.num_tokens in (0, NO_LENGTH_CONTROL)):
            raise ValueError(f"length.num_tokens={self.num_tokens} must be a budget other than 0 and -1 for mode 'fixed'")

    def draw(self, rng: random.Random) -> int:
        """One row's num_tokens."""
        if self.mode == "normal":
            return NO_LENGTH_CONTROL
        if self.mode == "fixed":
            return self.num_tokens
        if self.mode == "log":
            return int(2 ** rng.uniform(8, 14.5))
        if self.mode == "both":
            return rng.randint(100, 2000) if rng.random() < 0.5 else NO_LENGTH_CONTROL
        budget = rng.randint(100, 2000)
        if self.mode == "both_both" and rng.random() < 0.5:
            return -budget
        return budget


def length_instruction(num_tokens: int) -> str:
    """'Think for N tokens.', 'Think for maximum N tokens.' or '' (num_tokens = -1)."""
    if num_tokens == NO_LENGTH_CONTROL:
        return ""
    if num_tokens < 0:
        return f"Think for maximum {abs(num_tokens)} tokens."
    return f"Think for {num_tokens} tokens."


# --- Problems read from raw files ---------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One benchmark question as read from a raw file, before any prompt is built."""

    data_source: str
    question: str
    answer: str
    options: tuple[tuple[str, str], ...] = ()  # (letter, text), multiple choice only
    lower_limit: str | None = None
    upper_limit: str | None = None
    split: str | None = None  # from the record, if it says

    @property
    def task(self) -> str:
        return TASK_OF_SOURCE[self.data_source]

    def rendered_question(self) -> str:
        """The question, then one ``Letter: text`` line per option."""
        return "\n".join([self.question, *(f"{letter}: {text}" for letter, text in self.options)])

    def user_message(self, num_tokens: int) -> str:
        """Byte for byte Med-U1's: question, two spaces, answer instruction, space, length
        instruction (a trailing space where there is none), so prompts tokenise alike."""
        return f"{self.rendered_question()}  {TASK_INSTRUCTIONS[self.task]} {length_instruction(num_tokens)}"

    def to_row(self, num_tokens: int, split: str, index: int, system_prompt: str) -> PromptRow:
        messages = ((("system", system_prompt),) if system_prompt else ()) + (("user", self.user_message(num_tokens)),)
        return PromptRow(
            data_source=self.data_source, messages=messages, ground_truth=self.answer, num_tokens=num_tokens,
            lower_limit=self.lower_limit, upper_limit=self.upper_limit, split=split, index=index,
        )  # fmt: skip


class RecordError(ValueError):
    """A raw record this project cannot read; names the file, record and field."""


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field {key!r}={value!r} must be a non-empty string")
    return value


def _optional_text(record: dict, key: str, where: str) -> str | None:
    """A text or number field that may be absent, as text; None when absent or blank."""
    value = record.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise RecordError(f"{where}: field {key!r}={value!r} must be a string or a number")
    return None if value is None or (isinstance(value, str) and not value.strip()) else str(value)


def _letter_options(options: object, where: str, key: str) -> tuple[tuple[str, str], ...]:
    """Options as (letter, text): from {"A": text, ...} or a list [text, ...] lettered A, B, ..."""
    if isinstance(options, dict):
        pairs = [(str(letter).strip(), text) for letter, text in options.items() if text is not None]
    elif isinstance(options, (list, tuple)):
        if len(options) > len(LETTERS):
            raise RecordError(f"{where}: field {key!r} has {len(options)} options; at most {len(LETTERS)} (A-N)")
        pairs = list(zip(LETTERS, options))
    else:
        raise RecordError(f"{where}: field {key!r}={options!r} must be a mapping of letters to text or a list")
    for letter, text in pairs:
        if letter not in LETTERS or not isinstance(text, str):
            raise RecordError(f"{where}: field {key!r} has option {letter!r}={text!r}; letters A-N with text expected")
    return tuple(pairs)


def _checked_letter(answer: str, options: tuple[tuple[str, str], ...], where: str) -> str:
    letters = [letter for letter, _ in options]
    if answer not in letters:
        raise RecordError(f"{where}: answer {answer!r} is not one of the options {', '.join(letters)}")
    return answer


def read_medcalc(record: dict, where: str) -> Problem:
    """Med-U1 raw (problem, answer, Lower/Upper Limit) or the MedCalc-Bench release
    (Patient Note, Question, Ground Truth Answer, Lower/Upper Limit)."""
    if "problem" in record:
        question, answer = _text(record, "problem", where), _text(record, "answer", where)
    else:
        note, asked = _text(record, "Patient Note", where), _text(record, "Question", where)
        question, answer = f"<Context> {note} </Context> <Question> {asked} </Question>", _text(
            record, "Ground Truth Answer", where
        )
    return Problem("MedCalc-Bench", question, answer, lower_limit=_optional_text(record, "Lower Limit", where),
                   upper_limit=_optional_text(record, "Upper Limit", where), split=_optional_text(record, "split", where))


def read_mediq(record: dict, where: str) -> Problem:
    """Med-U1 raw (problem, options, answer letter) or the MediQ release (context, question,
    options, answer_idx)."""
    options = _letter_options(record.get("options"), where, "options")
    if "problem" in record:
        question, answer = _text(record, "problem", where), _text(record, "answer", where)
    else:
        context = record.get("context")
        if isinstance(context, list) and all(isinstance(part, str) for part in context):
            context = " ".join(context)
        elif context is not None and not isinstance(context, str):
            raise RecordError(f"{where}: field 'context'={context!r} must be a string or a list of strings")
        context = context or ""
        asked = _text(record, "question", where)
        question = f"<Context>{context}</Context> <Question>{asked}</Question>" if context else asked
        answer = _text(record, "answer_idx", where)
    return Problem("MedIQ", question, _checked_letter(answer.strip(), options, where), options,
                   split=_optional_text(record, "split", where))


def read_medxpertqa(record: dict, where: str) -> Problem:
    """Med-U1 raw (problem, choices, answer) or the MedXpertQA release (question, options, label)."""
    key = "choices" if "choices" in record else "options"
    options = _letter_options(record.get(key), where, key)
    question = _text(record, "problem" if "problem" in record else "question", where)
    answer = _text(record, "answer" if "answer" in record else "label", where)
    return Problem("MedXpertQA", question, _checked_letter(answer.strip(), options, where), options,
                   split=_optional_text(record, "split", where))


def read_huatuo(record: dict, where: str) -> Problem:
    """Med-U1 raw (problem, answer wrapped in <answer> tags) or the medical-o1-reasoning-SFT
    release (Question, Complex_CoT, Response)."""
    if "problem" in record:
        question, answer = _text(record, "problem", where), _strip_answer_tags(_text(record, "answer", where))
    else:
        question, answer = _text(record, "Question", where), _text(record, "Response", where)
    if not answer.strip():
        raise RecordError(f"{where}: the answer is empty once its <answer> tags are removed")
    return Problem("medical-o1-reasoning-SFT", question, answer, split=_optional_text(record, "split", where))


def _strip_answer_tags(answer: str) -> str:
    """'<answer>\\ntext\\n</answer>\\n' -> 'text\\n' (Med-U1 keeps the newline before the tag)."""
    if answer.startswith("<answer>"):
        answer = answer.removeprefix("<answer>").removeprefix("\n")
        answer = answer.removesuffix("\n").removesuffix("</answer>")
    return answer


def read_ehrnoteqa(record: dict, where: str) -> Problem:
    """EHRNoteQA release: clinical notes (note_1..), question, choice_A..choice_E, answer letter; or
    Med-U1 raw (problem, choices or options, answer letter)."""
    if "options" in record or "choices" in record:
        key = "options" if "options" in record else "choices"
        options = _letter_options(record[key], where, key)
    else:
        options = tuple((letter, record[f"choice_{letter}"]) for letter in LETTERS if record.get(f"choice_{letter}"))
        options = _letter_options(dict(options), where, "choice_*")
    notes = [str(record[key]) for key in sorted(record) if key.startswith("note") and record[key]]
    asked = _text(record, "question" if "question" in record else "problem", where)
    question = f"<Context>{' '.join(notes)}</Context> <Question>{asked}</Question>" if notes else asked
    return Problem("EHRNoteQA", question, _checked_letter(_text(record, "answer", where).strip(), options, where),
                   options, split=_optional_text(record, "split", where))


def read_mmlu_pro(record: dict, where: str) -> Problem:
    """MMLU-Pro release: question, options (a list of up to 10), answer letter (A-J)."""
    options = _letter_options(record.get("options"), where, "options")
    answer = _text(record, "answer", where).strip()
    return Problem("MMLU-Pro", _text(record, "question", where), _checked_letter(answer, options, where), options,
                   split=_optional_text(record, "split", where))


READERS: dict[str, Callable[[dict, str], Problem]] = {
    "medcalc": read_medcalc,
    "mediq": read_mediq,
    "medxpertqa": read_medxpertqa,
    "huatuo": read_huatuo,
    "ehrnoteqa": read_ehrnoteqa,
    "mmlu_pro": read_mmlu_pro,
}


def detect_format(record: dict) -> str | None:
    """The benchmark a raw record comes from, by its fields; None if unrecognised."""
    source = record.get("Source")
    if isinstance(source, str) and source in FORMAT_OF_SOURCE:  # a list or dict is no key
        return FORMAT_OF_SOURCE[source]
    keys = set(record)
    if {"Lower Limit", "Upper Limit"} & keys or "Ground Truth Answer" in keys:
        return "medcalc"
    if "Complex_CoT" in keys or ({"Question", "Response"} <= keys):
        return "huatuo"
    if "choice_A" in keys:
        return "ehrnoteqa"
    if "choices" in keys or ("label" in keys and isinstance(record.get("options"), dict)):
        return "medxpertqa"
    if isinstance(record.get("options"), list):
        return "mmlu_pro"
    if isinstance(record.get("options"), dict):
        return "mediq"
    return None


def load_records(path: Path) -> list[dict]:
    """Records of a .json (a list, or {"data": [...]}), .jsonl or .parquet file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            records = pq.read_table(path).to_pylist()
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                records = [json.loads(line) for line in handle if line.strip()]
        else:
            with open(path, encoding="utf-8") as handle:
                records = json.load(handle)
            if isinstance(records, dict) and isinstance(records.get("data"), list):
                records = records["data"]
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read records: {err}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of JSON objects (records)")
    for index, record in enumerate(records):
        for key, value in record.items():
            if not (_is_utf8(key) and _is_utf8(value)):  # JSON's "\ud800" escapes decode to text no file can hold
                raise RecordError(f"{path}: record {index}: field {key!r}={value!r:.120} holds a lone surrogate, "
                                  "which is not valid UTF-8 text")
    return records


def _is_utf8(value: object) -> bool:
    """False if ``value`` (or any text nested in it) cannot be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_is_utf8(k) and _is_utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_utf8(item) for item in value)
    return True


def split_of_file(path: Path) -> str:
    """Med-U1's naming: train_* -> train, *_test* -> test, anything else -> validation."""
    stem = path.stem.lower()
    if stem.startswith("train"):
        return "train"
    if "test" in stem.split("_")[1:] or stem.endswith("test"):
        return "test"
    return "validation"


def read_problems(path: Path, *, format_name: str | None = None) -> tuple[str, list[Problem]]:
    """(format, problems) of one raw file; the format is recognised from its first record. Without
    ``format_name``, a record whose ``Source`` names another benchmark is read as that benchmark, so
    a file that mixes them (Med-U1's ``medoption.json``: MedIQ, MedXpertQA and EHRNoteQA records)
    keeps each record's own data source."""
    records = load_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    given = format_name is not None
    if format_name is None:
        format_name = detect_format(records[0])
        if format_name is None:
            raise ValueError(
                f"{path}: cannot tell the benchmark from fields {sorted(records[0])}; pass --format "
                f"({', '.join(FORMATS)})"
            )
    check_choice("--format", format_name, FORMATS)
    problems = []
    for index, record in enumerate(records):
        source = record.get("Source")
        named = FORMAT_OF_SOURCE.get(source) if isinstance(source, str) and not given else None
        problems.append(READERS[named or format_name](record, f"{path}: record {index}"))
    return format_name, problems


# --- Preparation --------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareOptions:
    """Everything ``prepare`` needs besides the inputs."""

    length: LengthMode = field(default_factory=LengthMode)
    seed: int = 0
    split: str | None = None
    """Put every input in this split; None: each record's 'split' field, else the file name."""
    format_name: str | None = None
    """The benchmark of every input; None: recognised from the content."""
    name: str | None = None
    """The output name (one benchmark only); None: the benchmark's own name."""
    mix_name: str = "medoption"
    """Name of the combined multiple-choice training file (train_<mix_name>.parquet)."""
    sample_multiple_for_train: int = 1
    """Repeat each training row this many times, each with a freshly drawn budget."""
    system_prompt: str = SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.split is not None:
            check_choice("--split", self.split, SPLITS)
        if self.format_name is not None:
            check_choice("--format", self.format_name, FORMATS)
        check_range("--sample-multiple-for-train", self.sample_multiple_for_train, low=1, integer=True)
        if self.name is not None:
            check_file_name("--name", self.name)
        check_file_name("--mix-name", self.mix_name)


@dataclass
class PrepareSummary:
    """What ``prepare`` wrote and dropped."""

    written: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # file -> (name, split, rows)
    duplicates_dropped: Counter = field(default_factory=Counter)  # (name, split) -> rows dropped

    def format(self) -> str:
        lines = [f"{'file':<32} {'dataset':<14} {'split':<11} {'rows':>7}"]
        for file, (name, split, rows) in self.written.items():
            lines.append(f"{file:<32} {name:<14} {split:<11} {rows:>7}")
        dropped = sum(self.duplicates_dropped.values())
        details = ", ".join(f"{name}/{split}: {n}" for (name, split), n in sorted(self.duplicates_dropped.items()))
        lines.append(f"questions dropped as duplicates of another split: {dropped}" + (f" ({details})" if dropped else ""))
        return "\n".join(lines)


def prepare(inputs: Sequence[str | Path], output_dir: str | Path, options: PrepareOptions = PrepareOptions()) -> PrepareSummary:
    """Read raw benchmark files, build prompts, deduplicate across splits, write parquet files."""
    output_dir = Path(output_dir)
    problems: dict[tuple[str, str], list[Problem]] = defaultdict(list)  # (name, split) -> problems
    for path in map(Path, inputs):
        format_name, file_problems = read_problems(path, format_name=options.format_name)
        name = options.name or format_name
        for problem in file_problems:
            split = options.split or _record_split(problem.split) or split_of_file(path)
            problems[(name, split)].append(problem)
    if options.name is not None and len({name for name, _ in problems}) > 1:
        raise ValueError("--name applies to one benchmark only; the inputs hold several")

    summary = PrepareSummary()
    kept = _deduplicate(problems, summary.duplicates_dropped)
    rng = random.Random(options.seed)
    mix: list[PromptRow] = []
    mixed: set[str] = set()  # the names whose training rows are in the mix
    for (name, split), split_problems in sorted(kept.items(), key=lambda item: (item[0][0], SPLITS.index(item[0][1]))):
        repeats = options.sample_multiple_for_train if split == "train" else 1
        repeated = [problem for _ in range(repeats) for problem in split_problems]
        rows = [p.to_row(options.length.draw(rng), split, i, options.system_prompt) for i, p in enumerate(repeated)]
        file_name = {"train": f"train_{name}", "validation": name, "test": f"{name}_test"}[split] + ".parquet"
        path = safe_child(output_dir, file_name, field="--name")
        summary.written[file_name] = (name, split, write_rows(path, rows))
        if split == "train" and rows and TASK_OF_SOURCE[rows[0].data_source] == CHOICE:
            mix.extend(rows)
            mixed.add(name)
    if len(mixed) > 1:  # one name's file (e.g. --name medoption over a mixed file) is already the mix
        random.Random(options.seed).shuffle(mix)
        mix = [replace(row, index=i) for i, row in enumerate(mix)]
        file_name = f"train_{options.mix_name}.parquet"
        path = safe_child(output_dir, file_name, field="--mix-name")
        summary.written[file_name] = (options.mix_name, "train", write_rows(path, mix))
    return summary


def _record_split(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    aliases = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}
    value = aliases.get(value, value)
    return value if value in SPLITS else None


def question_key(problem: Problem) -> str:
    """What makes two questions the same: the rendered question, case and spacing ignored."""
    return " ".join(problem.rendered_question().lower().split())


def _deduplicate(
    problems: dict[tuple[str, str], list[Problem]], dropped: Counter
) -> dict[tuple[str, str], list[Problem]]:
    """Keep each question in its most precious split only (test > validation > train)."""
    best: dict[str, int] = {}
    for (_, split), split_problems in problems.items():
        for problem in split_problems:
            key = question_key(problem)
            best[key] = min(best.get(key, SPLIT_PRIORITY[split]), SPLIT_PRIORITY[split])
    kept = {}
    for (name, split), split_problems in problems.items():
        keep = [p for p in split_problems if best[question_key(p)] == SPLIT_PRIORITY[split]]
        if len(keep) < len(split_problems):
            dropped[(name, split)] += len(split_problems) - len(keep)
        kept[(name, split)] = keep
    return kept

