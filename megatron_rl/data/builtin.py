"""Built-in medical calculation tasks, generated from a seed, so training runs on any fresh clone.

    from megatron_rl.data.builtin import make_tasks, sft_examples
    paths = make_tasks("data/builtin", num_train=512, num_test=64, seed=0)  # {"train": ..., "test": ...}

    megatron-rl make-tasks --output-dir data/builtin [--num-train N] [--num-test N] [--seed S]

Two kinds of rows, written in the project's parquet schema and scored by the reward module as
it is (no reward change):

- ``calc`` (data_source ``MedCalc-Bench``): a calculation with an exact answer and
  MedCalc-Bench's ±5 % limits (exact limits for integer point scores);
- ``choice`` (data_source ``MedIQ``, a multiple-choice source): a calculation with four options
  A-D (standard: the three wrong ones from plausible formula mistakes), the correct letter
  uniform.

Two difficulties:

- ``standard``: Med-U1 prompts (its system prompt and answer instructions, built by
  ``megatron_rl.data.prepare``); ``calc`` asks for one of ten equation-based calculators,
  ``choice`` for the same with options.
- ``easy``: short prompts (74-121 tokens with the tiny test tokenizer, chat template
  included) shaped so that a tiny random-init model can learn them in minutes: a point score
  (CURB-65, qSOFA, Centor) whose criteria are listed as yes/no, one point each. ``calc`` asks
  for the score (the count of "yes"); ``choice`` for the option holding it, the score's four
  bands in ascending order (the band is drawn first, so the letter is uniform). Matching a
  value against shuffled options, as ``standard`` asks, stays near chance for such a model.

A question never repeats within or across splits. Everything depends on the seed only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.data.prepare import SYSTEM_PROMPT, Problem
from megatron_rl.data.schema import NO_LENGTH_CONTROL, PromptRow, write_rows
from megatron_rl.rewards.score import CHOICE, NUMERIC, OPEN_ENDED, TASK_OF_SOURCE
from megatron_rl.validation import check_choice, check_range

CALC_SOURCE = "MedCalc-Bench"
CHOICE_SOURCE = "MedIQ"
KINDS = ("calc", "choice")
DIFFICULTIES = ("easy", "standard")
TOLERANCE = 0.05
"""MedCalc-Bench's relative tolerance for equation-based calculators: limits are answer ± 5 %."""

EASY_SYSTEM_PROMPT = "<think>...</think><answer>...</answer>"
EASY_INSTRUCTIONS = {CHOICE: "Give the letter.", NUMERIC: "Give the number."}
"""Short prompts for the easy tasks (the Med-U1 system prompt alone is ~300 tiny-tokenizer tokens)."""

LETTERS = "ABCD"


# --- Formulas -------------------------------------------------------------------------------
# Pure functions of the inputs in the units MedCalc-Bench uses; each has a reference.


def body_mass_index(weight_kg: float, height_cm: float) -> float:
    """BMI = weight / height² (kg/m²). WHO, Obesity: preventing and managing the global epidemic (2000)."""
    return weight_kg / (height_cm / 100) ** 2


def mean_arterial_pressure(systolic: float, diastolic: float) -> float:
    """MAP = (SBP + 2 DBP) / 3 (mmHg). Standard estimate; e.g. Guyton & Hall, Textbook of Medical Physiology."""
    return (systolic + 2 * diastolic) / 3


def anion_gap(sodium: float, chloride: float, bicarbonate: float) -> float:
    """AG = Na - (Cl + HCO3) (mmol/L). Emmett & Narins, Medicine 1977;56:38-54."""
    return sodium - (chloride + bicarbonate)


def creatinine_clearance(age: float, weight_kg: float, creatinine_mg_dl: float, female: bool) -> float:
    """Cockcroft-Gault CrCl = (140 - age) weight / (72 Cr), x 0.85 for women (mL/min).
    Cockcroft & Gault, Nephron 1976;16:31-41."""
    return (140 - age) * weight_kg / (72 * creatinine_mg_dl) * (0.85 if female else 1.0)


def corrected_calcium(calcium_mg_dl: float, albumin_g_dl: float) -> float:
    """Ca + 0.8 (4 - albumin) (mg/dL). Payne et al., BMJ 1973;4:643-646."""
    return calcium_mg_dl + 0.8 * (4 - albumin_g_dl)


def qtc_bazett(qt_ms: float, heart_rate: float) -> float:
    """QTc = QT / sqrt(RR), RR = 60 / HR in seconds (ms). Bazett, Heart 1920;7:353-370."""
    return qt_ms / math.sqrt(60 / heart_rate)


def ideal_body_weight(height_cm: float, female: bool) -> float:
    """Devine: 50 kg (men) or 45.5 kg (women) + 2.3 kg per inch over 60 in.
    Devine, Drug Intell Clin Pharm 1974;8:650-655."""
    return (45.5 if female else 50.0) + 2.3 * (height_cm / 2.54 - 60)


def ldl_friedewald(total_cholesterol: float, hdl: float, triglycerides: float) -> float:
    """LDL = TC - HDL - TG / 5 (mg/dL). Friedewald et al., Clin Chem 1972;18:499-502."""
    return total_cholesterol - hdl - triglycerides / 5


def total_body_water_fraction(age: float, female: bool) -> float:
    """0.6 men, 0.5 women; 0.5 and 0.45 from age 65 (the fractions MedCalc-Bench uses)."""
    if female:
        return 0.45 if age >= 65 else 0.5
    return 0.5 if age >= 65 else 0.6


def free_water_deficit(sodium: float, weight_kg: float, age: float, female: bool) -> float:
    """FWD = TBW fraction x weight x (Na / 140 - 1) (L). Adrogué & Madias, NEJM 2000;342:1493-1499."""
    return total_body_water_fraction(age, female) * weight_kg * (sodium / 140 - 1)


def serum_osmolality(sodium: float, bun_mg_dl: float, glucose_mg_dl: float) -> float:
    """2 Na + BUN / 2.8 + glucose / 18 (mOsm/kg). Dorwart & Chalmers, Clin Chem 1975;21:190-194."""
    return 2 * sodium + bun_mg_dl / 2.8 + glucose_mg_dl / 18


def point_score(criteria: Sequence[bool]) -> int:
    """A score of one point per criterion met (CURB-65, qSOFA, Centor)."""
    return sum(bool(met) for met in criteria)


# --- Calculators: inputs, note, answer, plausible mistakes -----------------------------------


@dataclass(frozen=True)
class Calculator:
    """One equation-based calculation as a task.

    ``draw`` gives the inputs (a dict, also the keys of ``note``); ``compute`` the answer;
    ``mistakes`` results of plausible formula mistakes (the multiple-choice distractors).
    """

    name: str
    unit: str
    note: str
    draw: Callable[[random.Random], dict]
    compute: Callable[[dict], float]
    mistakes: Callable[[dict], tuple[float, ...]]


def _person(rng: random.Random) -> dict:
    female = rng.random() < 0.5
    return {"age": rng.randint(20, 89), "female": female, "sex": "woman" if female else "man"}


def _draw_map(rng: random.Random) -> dict:
    systolic = rng.randint(90, 180)
    return {**_person(rng), "systolic": systolic, "diastolic": rng.randint(50, min(110, systolic - 20))}


CALCULATORS = (
    Calculator(
        "body mass index", "kg/m²", "A {age}-year-old {sex} weighs {weight_kg} kg and is {height_cm} cm tall.",
        lambda rng: {**_person(rng), "weight_kg": rng.randint(45, 120), "height_cm": rng.randint(150, 195)},
        lambda x: body_mass_index(x["weight_kg"], x["height_cm"]),
        lambda x: (x["weight_kg"] / (x["height_cm"] / 100), x["weight_kg"] / (2 * x["height_cm"] / 100),
                   x["weight_kg"] / (x["height_cm"] / 100) ** 3),  # not squared, doubled, cubed
    ),
    Calculator(
        "mean arterial pressure", "mmHg", "A {age}-year-old {sex} has a blood pressure of {systolic}/{diastolic} mmHg.",
        _draw_map,
        lambda x: mean_arterial_pressure(x["systolic"], x["diastolic"]),
        lambda x: ((x["systolic"] + x["diastolic"]) / 2, (2 * x["systolic"] + x["diastolic"]) / 3,
                   x["systolic"] - x["diastolic"]),  # plain mean, weights swapped, pulse pressure
    ),
    Calculator(
        "anion gap", "mmol/L", "A {age}-year-old {sex} has sodium {sodium} mmol/L, chloride {chloride} mmol/L "
        "and bicarbonate {bicarbonate} mmol/L.",
        lambda rng: {**_person(rng), "sodium": rng.randint(134, 146), "chloride": rng.randint(95, 105),
                     "bicarbonate": rng.randint(16, 26)},
        lambda x: anion_gap(x["sodium"], x["chloride"], x["bicarbonate"]),
        lambda x: (x["sodium"] - x["chloride"] + x["bicarbonate"], x["sodium"] - x["chloride"],
                   x["sodium"] - x["bicarbonate"]),  # sign error, bicarbonate left out, chloride left out
    ),
    Calculator(
        "creatinine clearance (Cockcroft-Gault)", "mL/min",
        "A {age}-year-old {sex} weighs {weight_kg} kg; serum creatinine is {creatinine} mg/dL.",
        lambda rng: {**_person(rng), "weight_kg": rng.randint(45, 110), "creatinine": rng.randint(6, 30) / 10},
        lambda x: creatinine_clearance(x["age"], x["weight_kg"], x["creatinine"], x["female"]),
        lambda x: (creatinine_clearance(x["age"], x["weight_kg"], x["creatinine"], not x["female"]),
                   (140 - x["age"]) * x["weight_kg"] * x["creatinine"] / 72,
                   (140 + x["age"]) * x["weight_kg"] / (72 * x["creatinine"])),  # sex factor, x Cr, + age
    ),
    Calculator(
        "albumin-corrected calcium", "mg/dL", "A {age}-year-old {sex} has calcium {calcium} mg/dL and albumin "
        "{albumin} g/dL.",
        lambda rng: {**_person(rng), "calcium": rng.randint(70, 105) / 10, "albumin": rng.randint(15, 45) / 10},
        lambda x: corrected_calcium(x["calcium"], x["albumin"]),
        lambda x: (x["calcium"] - 0.8 * (4 - x["albumin"]), x["calcium"] + (4 - x["albumin"]),
                   x["calcium"] + 0.8 * x["albumin"]),  # sign error, factor 1, albumin not subtracted from 4
    ),
    Calculator(
        "corrected QT interval (Bazett)", "ms", "A {age}-year-old {sex} has a heart rate of {heart_rate}/min and "
        "a QT interval of {qt_ms} ms.",
        lambda rng: {**_person(rng), "qt_ms": rng.randint(80, 120) * 4, "heart_rate": rng.randint(50, 120)},
        lambda x: qtc_bazett(x["qt_ms"], x["heart_rate"]),
        lambda x: (x["qt_ms"] * x["heart_rate"] / 60, x["qt_ms"] * math.sqrt(60 / x["heart_rate"]),
                   x["qt_ms"] / (60 / x["heart_rate"]) ** (1 / 3)),  # no root, multiplied, Fridericia
    ),
    Calculator(
        "ideal body weight (Devine)", "kg", "A {age}-year-old {sex} is {height_cm} cm tall.",
        lambda rng: {**_person(rng), "height_cm": rng.randint(155, 195)},
        lambda x: ideal_body_weight(x["height_cm"], x["female"]),
        lambda x: (ideal_body_weight(x["height_cm"], not x["female"]),
                   (45.5 if x["female"] else 50.0) + 2.3 * (x["height_cm"] - 152.4),
                   (45.5 if x["female"] else 50.0) + 2.3 * x["height_cm"] / 2.54),  # sex, cm as inches, no -60
    ),
    Calculator(
        "LDL cholesterol (Friedewald)", "mg/dL", "A {age}-year-old {sex} has total cholesterol {total} mg/dL, "
        "HDL {hdl} mg/dL and triglycerides {triglycerides} mg/dL.",
        lambda rng: {**_person(rng), "total": rng.randint(170, 280), "hdl": rng.randint(35, 70),
                     "triglycerides": rng.randint(60, 300)},
        lambda x: ldl_friedewald(x["total"], x["hdl"], x["triglycerides"]),
        lambda x: (x["total"] - x["hdl"] - x["triglycerides"] / 2.2, x["total"] - x["hdl"] + x["triglycerides"] / 5,
                   x["total"] - x["triglycerides"] / 5),  # mmol factor, sign error, HDL left out
    ),
    Calculator(
        "free water deficit", "L", "A {age}-year-old {sex} weighs {weight_kg} kg; serum sodium is {sodium} mmol/L.",
        lambda rng: {**_person(rng), "weight_kg": rng.randint(45, 110), "sodium": rng.randint(146, 170)},
        lambda x: free_water_deficit(x["sodium"], x["weight_kg"], x["age"], x["female"]),
        lambda x: (0.6 * x["weight_kg"] * (x["sodium"] / 140 - 1), x["weight_kg"] * (x["sodium"] / 140 - 1),
                   total_body_water_fraction(x["age"], x["female"]) * x["weight_kg"] * (1 - 140 / x["sodium"])),
    ),  # one fraction for all, no fraction, ratio inverted
    Calculator(
        "serum osmolality", "mOsm/kg", "A {age}-year-old {sex} has sodium {sodium} mmol/L, BUN {bun} mg/dL and "
        "glucose {glucose} mg/dL.",
        lambda rng: {**_person(rng), "sodium": rng.randint(130, 150), "bun": rng.randint(7, 60),
                     "glucose": rng.randint(70, 400)},
        lambda x: serum_osmolality(x["sodium"], x["bun"], x["glucose"]),
        lambda x: (x["sodium"] + x["bun"] / 2.8 + x["glucose"] / 18, 2 * x["sodium"] + x["bun"] + x["glucose"],
                   2 * x["sodium"] + x["bun"] * 2.8 + x["glucose"] * 18 / 100),  # Na not doubled, raw units, x
    ),
)


@dataclass(frozen=True)
class PointScore:
    """A score of one point per criterion, its criteria in short words, and its values in four
    ascending bands (the options of a multiple-choice question)."""

    name: str
    criteria: tuple[str, ...]
    bands: tuple[tuple[int, ...], ...]


POINT_SCORES = (
    # Lim et al., Thorax 2003;58:377-382.
    PointScore("CURB-65", ("confused", "urea high", "high RR", "low BP", "age 65+"),
               ((0, 1), (2,), (3,), (4, 5))),
    # Seymour et al., JAMA 2016;315:762-774.
    PointScore("qSOFA", ("high RR", "altered mentation", "low systolic BP"), ((0,), (1,), (2,), (3,))),
    # Centor et al., Med Decis Making 1981;1:239-246.
    PointScore("Centor", ("tonsil exudate", "tender neck nodes", "fever", "no cough"), ((0, 1), (2,), (3,), (4,))),
)


# --- Problems ---------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """At most two decimals, trailing zeros dropped: 22.857 -> '22.86', 80.0 -> '80'."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def numeric_limits(answer: float) -> tuple[str, str]:
    """MedCalc-Bench's limits: answer ± 5 % (of |answer|), three decimals."""
    margin = abs(answer) * TOLERANCE
    return f"{answer - margin:.3f}", f"{answer + margin:.3f}"


def _listed(score: PointScore, met: Sequence[bool], rng: random.Random) -> str:
    """"CURB-65: low BP yes, confused no, ...": the criteria in random order."""
    shuffled = rng.sample(list(zip(score.criteria, met)), len(met))
    return f"{score.name}: " + ", ".join(f"{name} {'yes' if yes else 'no'}" for name, yes in shuffled)


def _calc_problem(rng: random.Random, difficulty: str) -> Problem:
    if difficulty == "easy":
        score = rng.choice(POINT_SCORES)
        met = [rng.random() < 0.5 for _ in score.criteria]
        answer = str(point_score(met))
        return Problem(CALC_SOURCE, f"{_listed(score, met, rng)}. Score?", answer, lower_limit=answer,
                       upper_limit=answer)
    calculator = rng.choice(CALCULATORS)
    inputs = calculator.draw(rng)
    answer = float(format_number(calculator.compute(inputs)))
    lower, upper = numeric_limits(answer)
    question = f"{calculator.note.format(**inputs)} What is the {calculator.name} in {calculator.unit}?"
    return Problem(CALC_SOURCE, question, format_number(answer), lower_limit=lower, upper_limit=upper)


def _easy_choice_problem(rng: random.Random) -> Problem:
    """A point score with its four bands as options in ascending order: the letter follows
    from the count of "yes". The band is drawn first, so the correct letter is uniform."""
    score = rng.choice(POINT_SCORES)
    correct = rng.randrange(len(LETTERS))
    total = rng.choice(score.bands[correct])
    chosen = set(rng.sample(range(len(score.criteria)), total))
    met = [i in chosen for i in range(len(score.criteria))]
    options = tuple((letter, "-".join(map(str, band))) for letter, band in zip(LETTERS, score.bands))
    return Problem(CHOICE_SOURCE, f"{_listed(score, met, rng)}. Which option?", LETTERS[correct], options)


def _choice_problem(rng: random.Random, difficulty: str) -> Problem:
    if difficulty == "easy":
        return _easy_choice_problem(rng)
    calculator = rng.choice(CALCULATORS)
    inputs = calculator.draw(rng)
    answer = calculator.compute(inputs)
    pronoun = "her" if inputs["female"] else "his"
    shown = [format_number(answer), *_distinct_values(answer, calculator.mistakes(inputs))]
    question = f"{calculator.note.format(**inputs)} What is {pronoun} {calculator.name} in {calculator.unit}?"
    correct = rng.randrange(len(LETTERS))
    wrong = shown[1:]
    rng.shuffle(wrong)
    texts = wrong[:correct] + [shown[0]] + wrong[correct:]
    return Problem(CHOICE_SOURCE, question, LETTERS[correct], tuple(zip(LETTERS, texts)))


def _distinct_values(answer: float, mistakes: Sequence[float]) -> list[str]:
    """Three distractors, each more than 5 % away from the answer and from each other: the
    formula mistakes first, then fixed scalings of the answer where mistakes coincide."""
    chosen: list[float] = []
    for value in (*mistakes, answer * 0.8, answer * 1.25, answer * 0.65, answer * 1.5):
        if all(abs(value - other) > TOLERANCE * max(abs(other), 1e-9) for other in (answer, *chosen)):
            chosen.append(value)
        if len(chosen) == len(LETTERS) - 1:
            return [format_number(value) for value in chosen]
    raise AssertionError(f"no three distinct distractors for {answer}")  # the scalings always suffice


def _row(problem: Problem, difficulty: str, split: str, index: int) -> PromptRow:
    """Standard: the Med-U1 prompt of ``prepare``. Easy: a short system prompt and instruction."""
    if difficulty == "standard":
        return problem.to_row(NO_LENGTH_CONTROL, split, index, SYSTEM_PROMPT)
    user = f"{problem.rendered_question()}  {EASY_INSTRUCTIONS[problem.task]}"
    return PromptRow(
        data_source=problem.data_source, messages=(("system", EASY_SYSTEM_PROMPT), ("user", user)),
        ground_truth=problem.answer, lower_limit=problem.lower_limit, upper_limit=problem.upper_limit,
        split=split, index=index,
    )  # fmt: skip


_MAKERS = {"calc": _calc_problem, "choice": _choice_problem}


def make_rows(num_rows: int, *, split: str, rng: random.Random, kinds: Sequence[str], difficulty: str,
              seen: set[str]) -> list[PromptRow]:
    """``num_rows`` rows, kinds in turn (so balanced), shuffled; questions in ``seen`` are drawn
    again, and the new ones are added to it.

    Raises:
        ValueError: fewer distinct questions than asked for were found in 20 draws per row (plus
            1000): the kinds hold too few.
    """
    problems = []
    for _ in range(20 * num_rows + 1000):
        if len(problems) == num_rows:
            break
        problem = _MAKERS[kinds[len(problems) % len(kinds)]](rng, difficulty)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < num_rows:
        raise ValueError(f"num_{split}={num_rows}: only {len(problems)} distinct {difficulty} questions of kinds "
                         f"{', '.join(kinds)} were found; ask for fewer")
    rng.shuffle(problems)
    return [_row(problem, difficulty, split, index) for index, problem in enumerate(problems)]


def make_tasks(
    out_dir: str | Path, *, num_train: int = 512, num_test: int = 64, seed: int = 0,
    kinds: Sequence[str] = KINDS, difficulty: str = "easy",
) -> dict[str, Path]:
    """Generate the built-in tasks and write ``train_builtin_<difficulty>.parquet`` and
    ``builtin_<difficulty>_test.parquet`` in ``out_dir`` (atomically). The same arguments give
    the same files; no test question appears in the training file.

    Args:
        out_dir: the output folder (created).
        num_train, num_test: rows per split (kinds alternate, so each kind has about half).
        seed: the only source of randomness.
        kinds: any of "calc" (MedCalc-Bench rows) and "choice" (MedIQ rows, options A-D).
        difficulty: "easy" (short prompts a tiny model can learn) or "standard" (Med-U1 prompts).

    Returns:
        {"train": path, "test": path}.

    Raises:
        ValueError: an unknown kind or difficulty, a count below 1, or more rows than there
            are distinct questions.
    """
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds={kinds!r} must name at least one of {', '.join(KINDS)}")
    for kind in kinds:
        check_choice("kinds", kind, KINDS)
    check_choice("difficulty", difficulty, DIFFICULTIES)
    check_range("num_train", num_train, low=1, integer=True)
    check_range("num_test", num_test, low=1, integer=True)
    rng, seen = random.Random(seed), set()
    paths = task_files(out_dir, difficulty)
    # Test first: its questions are the ones training must not see.
    for split, num_rows in (("test", num_test), ("train", num_train)):
        rows = make_rows(num_rows, split=split, rng=rng, kinds=kinds, difficulty=difficulty, seen=seen)
        write_rows(paths[split], rows)
    return paths


def task_files(out_dir: str | Path, difficulty: str) -> dict[str, Path]:
    """Where :func:`make_tasks` writes: {"train": .../train_builtin_<difficulty>.parquet,
    "test": .../builtin_<difficulty>_test.parquet}."""
    out_dir = Path(out_dir)
    return {"train": out_dir / f"train_builtin_{difficulty}.parquet",
            "test": out_dir / f"builtin_{difficulty}_test.parquet"}


# --- Ideal responses for a format warm-up -----------------------------------------------------


def ideal_response(row: PromptRow) -> str:
    """A short, well-formatted response answering ``row`` with its ground truth:
    ``<think>...</think><answer>truth</answer>``, the format the reward checks."""
    task = TASK_OF_SOURCE[row.data_source]
    if task == CHOICE:
        text = _option_text(row.messages[-1][1], row.ground_truth)
        thought = f"{text} is option {row.ground_truth}." if text else f"The correct option is {row.ground_truth}."
    elif task == NUMERIC:
        thought = f"The result is {row.ground_truth}."
    else:
        assert task == OPEN_ENDED, task
        thought = "Let me answer briefly."
    return f"<think>{thought}</think><answer>{row.ground_truth}</answer>"


def _option_text(user_message: str, letter: str) -> str | None:
    """The text of option ``letter`` in a prompt's "Letter: text" lines (the instruction after
    the last option cut off); None if the prompt has no such line."""
    for line in user_message.splitlines():
        if line.startswith(f"{letter}: "):
            return line[len(letter) + 2 :].split("  ", 1)[0].strip() or None
    return None


def sft_examples(rows: Sequence[PromptRow]) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages as [{"role", "content"}, ...], ideal response) for each row."""
    return [([{"role": role, "content": content} for role, content in row.messages], ideal_response(row))
            for row in rows]
