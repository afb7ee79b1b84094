"""Data pipeline speed: preparing raw files, building a PromptDataset, drawing batches; rows/second.

    .venv/bin/python bench/data.py [--data ../shared/data/medu1] [--rows 8000] [--tokenizer DIR]

The input is the shipped Med-U1 files replicated to about ``--rows`` rows, in two forms: as
shipped (already chat-templated) and as chat messages (system + user, so the chat template
runs). Each figure is printed beside a baseline measured in the same run:

* prepare-data: raw Med-U1 JSON replicated to ``--rows`` records, against preparing them as the
  Med-U1 script does (the chat template applied per row at preparation time);
* dataset: the straightforward per-row loop (pyarrow ``to_pylist``, the same schema check, then
  ``apply_chat_template`` and ``tokenizer(...)`` called once per row); both must give the same examples.
* batches: ``torch.utils.data.DataLoader`` over the examples (shuffle, drop_last, list collate).

The default tokenizer is the tiny test tokenizer (megatron_rl.testing): with 1024 tokens it cuts
these prompts into about 2 characters a token (real Qwen2.5 vocabularies take roughly twice that),
so tokenising, which dominates construction, is slower than with a real model's tokenizer; pass
``--tokenizer`` with a local tokenizer folder to measure that instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_rl.data.dataset import PromptDataset, PromptExample, PromptSampler, batches, render_prompts, tokenize
from megatron_rl.data.prepare import SYSTEM_PROMPT, LengthMode, PrepareOptions, prepare, read_problems
from megatron_rl.data.schema import read_many, row_from_record, write_rows

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
MEDU1_NAMES = ("mediq", "medxpertqa", "medcalc", "huatuo")
QWEN_PROMPT = re.compile(
    r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n",
    re.DOTALL,
)


# --- inputs -------------------------------------------------------------------------------


def replicate_medu1(data_dir: Path, out_dir: Path, num_rows: int) -> list[Path]:
    """Each Med-U1 file repeated to its share of ``num_rows`` rows, written to ``out_dir``."""
    tables = {name: pq.read_table(data_dir / f"{name}.parquet") for name in MEDU1_NAMES}
    factor = num_rows / sum(table.num_rows for table in tables.values())
    paths = []
    for name, table in tables.items():
        big = pa.concat_tables([table] * math.ceil(factor)).slice(0, round(table.num_rows * factor))
        paths.append(out_dir / f"{name}.parquet")
        pq.write_table(big, paths[-1])
    return paths


def as_chat_messages(paths: list[Path], out_dir: Path) -> list[Path]:
    """The same rows with each templated prompt split back into system and user messages."""
    out = []
    for path in paths:
        rows, _ = read_many([path])
        split = []
        for row in rows:
            system, user = QWEN_PROMPT.fullmatch(row.messages[0][1]).groups()
            split.append(dataclasses.replace(row, messages=(("system", system), ("user", user))))
        out.append(out_dir / f"{path.stem}_messages.parquet")
        write_rows(out[-1], split)
    return out


# --- baselines ----------------------------------------------------------------------------


def baseline_dataset(paths: list[Path], tokenizer, max_prompt_length: int) -> list[PromptExample]:
    """One row at a time: check, render, tokenise, filter."""
    examples = []
    for path in map(str, paths):
        for index, record in enumerate(pq.read_table(path).to_pylist()):
            row = row_from_record(record, where=f"{path}: row {index}")
            if row.is_templated:
                text = row.messages[0][1]
            else:
                messages = [{"role": role, "content": content} for role, content in row.messages]
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) <= max_prompt_length:
                examples.append(PromptExample(row, path, index, text, tuple(ids)))
    return examples


def baseline_epoch(examples: list[PromptExample], batch_size: int, seed: int) -> int:
    """One epoch of a torch DataLoader; returns the examples drawn."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(examples, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=list,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return sum(len(batch) for batch in loader)


# --- measurement --------------------------------------------------------------------------


def best_seconds(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """The fastest of ``repeats`` calls (the one least disturbed by other work on the machine),
    and the last call's result."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure_dataset(
    paths: list[Path], tokenizer, *, max_prompt_length: int = 1024, batch_size: int = 4, repeats: int = 2
) -> dict[str, float]:
    """Rows/second of PromptDataset construction and of one epoch of batches, each with its
    baseline (which must produce the same examples), and seconds of each construction step once."""
    build, dataset = best_seconds(lambda: PromptDataset(paths, tokenizer, max_prompt_length=max_prompt_length), repeats)
    build_base, expected = best_seconds(lambda: baseline_dataset(paths, tokenizer, max_prompt_length), repeats)
    if dataset.examples != expected:
        raise AssertionError("PromptDataset and the per-row baseline disagree")
    num_rows = len(dataset) + dataset.num_filtered

    read, (rows, _) = best_seconds(lambda: read_many(paths), 1)
    render, texts = best_seconds(lambda: render_prompts(rows, tokenizer), 1)
    tokenise, _ = best_seconds(lambda: tokenize(texts, tokenizer), 1)

    def one_epoch() -> int:
        return sum(len(batch) for batch in batches(dataset, PromptSampler(len(dataset), batch_size, seed=0)))

    epoch, drawn = best_seconds(one_epoch, repeats * 5)
    epoch_base, drawn_base = best_seconds(lambda: baseline_epoch(dataset.examples, batch_size, 0), repeats * 5)
    return {
        "rows": num_rows, "kept": len(dataset),
        "build_rows_per_s": num_rows / build, "build_base_rows_per_s": num_rows / build_base,
        "read_s": read, "render_s": render, "tokenise_s": tokenise,
        "epoch_rows_per_s": drawn / epoch, "epoch_base_rows_per_s": drawn_base / epoch_base,
    }  # fmt: skip


def replicate_raw(data_dir: Path, out_dir: Path, num_rows: int) -> list[Path]:
    """The raw Med-U1 JSON files repeated to about ``num_rows`` records, questions made distinct
    (a copy number appended) so that deduplication keeps them all."""
    records = {name: json.loads((data_dir / "raw" / f"{name}.json").read_text()) for name in MEDU1_NAMES}
    factor = num_rows / sum(len(r) for r in records.values())
    paths = []
    for name, rows in records.items():
        count = round(len(rows) * factor)
        big = [{**rows[i % len(rows)], "problem": f"{rows[i % len(rows)]['problem']} ({i // len(rows)})"}
               for i in range(count)]  # fmt: skip
        paths.append(out_dir / "raw" / f"train_{name}.json")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_text(json.dumps(big))
    return paths


def baseline_prepare(paths: list[Path], out_dir: Path, tokenizer) -> int:
    """Preparation as the Med-U1 script does it: per record, build the prompt and apply the chat
    template right away (once per row), then write one parquet per input."""
    written = 0
    rng = random.Random(0)
    for path in paths:
        format_name, problems = read_problems(path)
        records = []
        for index, problem in enumerate(problems):
            num_tokens = LengthMode().draw(rng)
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": problem.user_message(num_tokens)}]  # fmt: skip
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            row = dataclasses.replace(problem.to_row(num_tokens, "train", index, SYSTEM_PROMPT),
                                      messages=(("user", text),))  # fmt: skip
            records.append(row)
        written += write_rows(out_dir / f"train_{format_name}.parquet", records)
    return written


def measure_prepare(paths: list[Path], work_dir: Path, tokenizer, repeats: int) -> dict[str, float]:
    """Rows/second of ``prepare`` (read, recognise, build prompts, deduplicate, write) and of the
    per-row templating baseline, on the same raw files."""
    build, summary = best_seconds(lambda: prepare(paths, work_dir / "ours", PrepareOptions(seed=0)), repeats)
    build_base, rows_base = best_seconds(lambda: baseline_prepare(paths, work_dir / "base", tokenizer), repeats)
    rows = sum(written for file, (_, _, written) in summary.written.items() if not file.startswith("train_medoption"))
    assert rows == rows_base, (rows, rows_base)
    return {"rows": rows, "ours": rows / build, "base": rows_base / build_base}


def load_tokenizer(path: Path | None, work_dir: Path):
    from transformers import AutoTokenizer

    if path is None:
        from megatron_rl.testing import tiny_model

        path = tiny_model(work_dir / "tiny")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def print_dataset(name: str, figures: dict[str, float]) -> None:
    f = figures
    print(f"\n{name}: {f['rows']:,} rows, {f['kept']:,} kept")
    print(f"  {'':<30} {'ours rows/s':>12} {'baseline rows/s':>16} {'ratio':>7}")
    print(
        f"  {'PromptDataset construction':<30} {f['build_rows_per_s']:>12,.0f} {f['build_base_rows_per_s']:>16,.0f} "
        f"{f['build_rows_per_s'] / f['build_base_rows_per_s']:>6.1f}x"
    )
    print(
        f"  {'one epoch of batches':<30} {f['epoch_rows_per_s']:>12,.0f} {f['epoch_base_rows_per_s']:>16,.0f} "
        f"{f['epoch_rows_per_s'] / f['epoch_base_rows_per_s']:>6.1f}x"
    )
    print(f"  construction steps (once): read + check {f['read_s']:.2f} s, render {f['render_s']:.2f} s, "
          f"tokenise {f['tokenise_s']:.2f} s")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "medu1")
    parser.add_argument("--rows", type=int, default=8000, help="rows of input, replicated from the Med-U1 files")
    parser.add_argument("--tokenizer", type=Path, default=None, help="local tokenizer folder (default: tiny)")
    parser.add_argument("--max-prompt-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per figure")
    args = parser.parse_args()
    missing = [name for name in MEDU1_NAMES if not (args.data / f"{name}.parquet").is_file()]
    if missing:
        print(f"Med-U1 files not found in {args.data} (missing: {', '.join(missing)}); "
              "pass --data with the folder holding mediq/medxpertqa/medcalc/huatuo.parquet", file=sys.stderr)  # fmt: skip
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = load_tokenizer(args.tokenizer, work)
        print(f"tokenizer: {args.tokenizer or 'tiny test tokenizer (1024 tokens)'}; "
              f"max_prompt_length {args.max_prompt_length}, batch_size {args.batch_size}")  # fmt: skip
        templated = replicate_medu1(args.data, work, args.rows)
        forms = {
            "Med-U1 files as shipped (templated)": templated,
            "chat-message form": as_chat_messages(templated, work),
        }
        raw = replicate_raw(args.data, work, args.rows)
        prep = measure_prepare(raw, work, tokenizer, args.repeats)
        print(f"\nprepare-data on {prep['rows']:,} raw records (4 benchmarks, plus the multiple-choice mix)")
        print(f"  {'':<30} {'ours rows/s':>12} {'baseline rows/s':>16} {'ratio':>7}")
        print(f"  {'raw files -> parquet':<30} {prep['ours']:>12,.0f} {prep['base']:>16,.0f} "
              f"{prep['ours'] / prep['base']:>6.1f}x   (baseline: templated per row, as Med-U1 prepares)")  # fmt: skip
        for name, paths in forms.items():
            figures = measure_dataset(paths, tokenizer, max_prompt_length=args.max_prompt_length,
                                      batch_size=args.batch_size, repeats=args.repeats)  # fmt: skip
            print_dataset(name, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
