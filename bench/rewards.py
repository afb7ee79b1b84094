"""Reward scoring speed: responses/second per task type, a 2-process batch, and the worst case.

    .venv/bin/python bench/rewards.py [--data ../shared/data/medu1] [--seconds 2]

Each figure is printed beside a baseline measured in the same run: the straightforward
implementation (``re.finditer`` for the answer, ``str.count`` for the tags, nltk's
``sentence_bleu`` three times per open-ended answer), i.e. how the Med-U1 reference scores.
Responses are built from the Med-U1 files (8 per prompt, as GRPO samples them) or, without
them, from the built-in sample.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from megatron_rl.rewards import score, score_batch, task_of, text
from megatron_rl.rewards.score import parse_number

REPO = Path(__file__).resolve().parents[1]
RESPONSES_PER_PROMPT = 8
THINKING = ("The patient presents with findings that narrow the differential. Considering the history, "
            "the examination and the laboratory values, the most likely explanation follows. ") * 6


def build_rows(data_dir: Path) -> dict[str, list[dict]]:
    """Realistic rows per task type: a reasoning block, then a right or wrong answer."""
    rng = random.Random(0)
    specs = []
    if all((data_dir / f"{n}.parquet").is_file() for n in ("mediq", "medcalc", "huatuo")):
        from megatron_rl.data.schema import read_rows

        for name in ("mediq", "medxpertqa", "medcalc", "huatuo"):
            specs += [vars(s) for s in read_rows(data_dir / f"{name}.parquet")[0]]
    else:
        from megatron_rl.rewards.sample import SAMPLE

        print(f"(Med-U1 files not found at {data_dir}: using the built-in sample)")
        specs = [dict(s, lower_limit=s.get("lower_limit"), upper_limit=s.get("upper_limit")) for s in SAMPLE]
    truths = [s["ground_truth"] for s in specs]
    rows: dict[str, list[dict]] = {}
    for spec in specs:
        for k in range(RESPONSES_PER_PROMPT):
            answer = spec["ground_truth"] if k % 2 == 0 else rng.choice(truths)
            rows.setdefault(task_of(spec["data_source"]), []).append({
                "data_source": spec["data_source"], "ground_truth": spec["ground_truth"],
                "lower_limit": spec["lower_limit"], "upper_limit": spec["upper_limit"],
                "num_tokens": spec["num_tokens"], "response_num_tokens": rng.randint(50, 3000),
                "response": f"<think>{THINKING}</think>\n<answer>{answer}</answer>",
            })
    return rows


# --- the baseline -------------------------------------------------------------------------


def baseline_score(row: dict) -> float:
    response, truth = row["response"], row["ground_truth"]
    matches = list(re.finditer(r"<answer>(.*?)</answer>", response, re.DOTALL))
    answer = matches[-1].group(1).strip() if matches else None
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    positions = [response.find(t) for t in tags]
    well = all(response.count(t) == 1 for t in tags) and positions == sorted(positions)
    total = 1.0 if well else -1.0
    if not answer:
        return total - 2
    task = task_of(row["data_source"])
    if task == "multiple_choice":
        correct = 1.0 if answer == truth else -1.0
    elif task == "numeric":
        value = parse_number(answer)
        if parse_number(truth) is None:
            correct = 1.0 if answer == truth else -1.0
        else:
            inside = value is not None and float(row["lower_limit"]) <= value <= float(row["upper_limit"])
            correct = 1.0 if inside else -1.0
    else:
        smoothing = SmoothingFunction().method1
        bleu = sum(round(sentence_bleu([truth.split()], answer.split(), weights=w, smoothing_function=smoothing), 4)
                   for w in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)]) / 3
        correct = 1.0 if 0.5 * text.ems(answer, truth) + 0.5 * bleu > 45 else -1.0
    return total + correct


# --- measurement --------------------------------------------------------------------------


def rate(fn: Callable[[dict], object], rows: list[dict], seconds: float) -> float:
    """Responses per second of ``fn`` over ``rows``: the best of repeated passes lasting about
    ``seconds`` in all (the best pass is the one least disturbed by other work on the machine)."""
    best, spent = 0.0, 0.0
    while spent < seconds or best == 0.0:
        start = time.perf_counter()
        for row in rows:
            fn(row)
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, len(rows) / elapsed)
    return best


def ours(row: dict) -> object:
    return score(row["data_source"], row["response"], row["ground_truth"], lower_limit=row["lower_limit"],
                 upper_limit=row["upper_limit"], num_tokens=row["num_tokens"],
                 response_num_tokens=row["response_num_tokens"])


def worst_case(row: dict, response: str, repeats: int = 5) -> tuple[float, float]:
    """Best-of-``repeats`` milliseconds for one response: ours and the baseline."""
    row = dict(row, response=response)
    timings = []
    for fn in (ours, baseline_score):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(row)
            best = min(best, time.perf_counter() - start)
        timings.append(best * 1000)
    return timings[0], timings[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "medu1")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    rows = build_rows(args.data)

    print(f"{'task':<16} {'ours resp/s':>12} {'baseline resp/s':>16} {'ratio':>7}")
    for task, task_rows in sorted(rows.items()):
        task_rows = task_rows[:4000]
        mine = rate(ours, task_rows, args.seconds)
        base = rate(baseline_score, task_rows, args.seconds)
        print(f"{task:<16} {mine:>12,.0f} {base:>16,.0f} {mine / base:>6.1f}x")

    mixed = [row for task_rows in rows.values() for row in task_rows]
    random.Random(1).shuffle(mixed)
    batch = (mixed * (1 + 40_000 // len(mixed)))[:40_000]
    score_batch(batch[:2048], num_workers=2)  # start the pool once, as a trainer would
    timings = {}
    for workers in (1, 2):
        start = time.perf_counter()
        score_batch(batch, num_workers=workers)
        timings[workers] = time.perf_counter() - start
    print(f"\nscore_batch of {len(batch):,} mixed responses: 1 process {len(batch) / timings[1]:,.0f}/s, "
          f"2 processes {len(batch) / timings[2]:,.0f}/s ({timings[1] / timings[2]:.2f}x)")

    open_row = rows["open_ended"][0]
    words = open_row["ground_truth"].split() or ["diplopia"]
    rng = random.Random(2)
    big_answer = " ".join(rng.choice(words) for _ in range(40_000))[:200_000]
    cases = {
        "200 kB open-ended answer": f"<think>t</think><answer>{big_answer}</answer>",
        "200 kB reasoning, short answer": f"<think>{big_answer}</think><answer>{open_row['ground_truth']}</answer>",
        "200 kB of 10,000 <answer> tags": "<answer>x</answer>" * 10_000 + "z" * 30_000,
        "200 kB of unclosed <answer> tags": "<answer>" * 25_000,
    }
    print(f"\n{'worst case (one response)':<34} {'ours ms':>9} {'baseline ms':>12} {'ratio':>7}")
    for name, response in cases.items():
        mine_ms, base_ms = worst_case(open_row, response, repeats=3 if "unclosed" in name else 5)
        print(f"{name:<34} {mine_ms:>9.2f} {base_ms:>12.2f} {base_ms / mine_ms:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
