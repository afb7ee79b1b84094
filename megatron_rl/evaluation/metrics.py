"""Evaluation summary from per-sample records: pure functions of the records in ``results.jsonl``.

Per benchmark (``data_source``) and length budget: accuracy (the rewards' 0/1 validation score,
averaged over every sample), the format-valid rate (<think></think><answer></answer> written as the
reward asks), EMS and ROUGE-L for open-ended answers, mean response length in tokens, pass@1 and
pass@k (unbiased estimator), looping responses (:mod:`megatron_rl.evaluation.looping`) and their share
of the generated tokens, and with a budget the mean |length - budget|. Prompts evaluated with their
own length instructions ("Think for N tokens.", no --budgets) are one row whose budget column reads
``own LOW-HIGH`` and whose budget error is measured against each prompt's own N.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from megatron_rl.rewards.score import OPEN_ENDED, task_of

Record = Mapping[str, object]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one prompt (Chen et al. 2021): ``1 - C(n - c, k) / C(n, k)``, the chance
    that at least one of k samples drawn without replacement from the n is correct.

    Raises:
        ValueError: not ``0 <= num_correct <= num_samples`` or not ``1 <= k <= num_samples``.
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} must lie in [0, num_samples={num_samples}]")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k={k} must lie in [1, num_samples={num_samples}]")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples per prompt: 1, then powers of two below n, then n."""
    ks = [1]
    while ks[-1] * 2 < n:
        ks.append(ks[-1] * 2)
    return ks + [n] if n > 1 else ks


def summarize(records: Iterable[Record], n: int) -> list[dict[str, object]]:
    """One summary row per (data_source, budget), sorted by data_source then budget (None first).

    Each record is one sample (see :mod:`megatron_rl.evaluation.runner` for its fields); every prompt
    must have exactly ``n`` samples. Row fields: data_source, task, budget, budget_label (the budget,
    ``own LOW-HIGH`` for prompts' own instructions, or ``none``), prompts, samples, accuracy,
    format_valid (fraction), mean_length, truncated (fraction cut at max_tokens), looping (looping
    responses), looping_token_share (their tokens / all response tokens), pass@k for k in
    :func:`pass_ks`, and ems / rouge_l (open-ended) and mean_abs_budget_error (with a budget or own
    instructions), else None. Records written before a field existed give None for it.
    """
    groups: dict[tuple[str, int | None], dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[(str(record["data_source"]), record["budget"])][str(record["id"])].append(record)
    rows = []
    for (source, budget), prompts in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or -1)):
        samples = [r for group in prompts.values() for r in group]
        for prompt_id, group in prompts.items():
            if len(group) != n:
                raise ValueError(f"prompt {prompt_id!r} (budget {budget}) has {len(group)} samples, expected n={n}")
        lengths = [int(r["response_num_tokens"]) for r in samples]
        open_ended = task_of(source) == OPEN_ENDED
        label, budget_error = _budget_label_and_error(samples, budget)
        looping = [r for r in samples if r.get("loop_period") is not None]
        has_loops = all("loop_period" in r for r in samples)
        row: dict[str, object] = {
            "data_source": source,
            "task": task_of(source),
            "budget": budget,
            "budget_label": label,
            "prompts": len(prompts),
            "samples": len(samples),
            "accuracy": _mean(float(r["score"]) for r in samples),
            "format_valid": (_mean(float(r["format_valid"]) for r in samples)
                             if all("format_valid" in r for r in samples) else None),
            "ems": _mean(float(r["ems"]) for r in samples) if open_ended else None,
            "rouge_l": _mean(float(r["rouge_l"]) for r in samples) if open_ended else None,
            "mean_length": _mean(lengths),
            "mean_abs_budget_error": budget_error,
            "truncated": _mean(float(r["finish_reason"] == "length") for r in samples),
            "looping": len(looping) if has_loops else None,
            "looping_token_share": (sum(int(r["response_num_tokens"]) for r in looping) / max(1, sum(lengths))
                                    if has_loops else None),
        }
        for k in pass_ks(n):
            row[f"pass@{k}"] = _mean(pass_at_k(n, sum(int(r["score"]) for r in group), k) for group in prompts.values())
        rows.append(row)
    return rows


def _budget_label_and_error(samples: Sequence[Record], budget: int | None) -> tuple[str, float | None]:
    """The budget column and the mean |length - budget| of one summary row: the budget itself, or
    for prompts evaluated with their own instructions (``budget`` None) ``own LOW-HIGH`` ("max" for
    "Think for maximum N tokens.") measured against each prompt's own N, or ``none``."""
    lengths = [int(r["response_num_tokens"]) for r in samples]
    if budget is not None:
        return str(budget), _mean(abs(x - int(budget)) for x in lengths)
    own = [(abs(int(r.get("num_tokens", -1))), int(r["response_num_tokens"]), int(r.get("num_tokens", -1)) < 0)
           for r in samples if int(r.get("num_tokens", -1)) != -1]
    if not own:
        return "none", None
    low, high = min(n for n, _, _ in own), max(n for n, _, _ in own)
    label = "own " + ("max " if all(is_max for _, _, is_max in own) else "") + (
        f"{low}" if low == high else f"{low}-{high}")
    if len(own) < len(samples):
        label += f" ({len(samples) - len(own)} of {len(samples)} none)"
    return label, _mean(abs(length - n) for n, length, _ in own)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def format_markdown(rows: Sequence[Mapping[str, object]], n: int) -> str:
    """A Markdown table of :func:`summarize`'s rows (EMS and ROUGE-L on 0-100, the rest as fractions)."""
    ks = pass_ks(n)
    columns = ["benchmark", "budget", "prompts", "samples", "accuracy", "format valid", "EMS", "ROUGE-L",
               "mean length", "mean |len - budget|", "truncated", "looping (share of tokens)",
               *(f"pass@{k}" for k in ks)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        label = row.get("budget_label") or ("none" if row["budget"] is None else row["budget"])
        looping = ("-" if row.get("looping") is None else
                   f"{row['looping']} ({100 * float(row['looping_token_share']):.0f}%)")
        cells = [row["data_source"], label, row["prompts"], row["samples"], _fmt(row["accuracy"], 3),
                 _fmt(row.get("format_valid"), 3), _fmt(row["ems"], 1), _fmt(row["rouge_l"], 1),
                 _fmt(row["mean_length"], 1), _fmt(row["mean_abs_budget_error"], 1), _fmt(row["truncated"], 3),
                 looping, *(_fmt(row[f"pass@{k}"], 3) for k in ks)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _fmt(value: object, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"
