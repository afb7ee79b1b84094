"""The ``megatron-rl`` command: one subcommand per job.

    megatron-rl score FILE.parquet --responses FILE.jsonl [--config CFG.yaml] [reward.k=v ...]
    megatron-rl score FILE.parquet --oracle
    megatron-rl score --sample
    megatron-rl prepare-data --input RAW [RAW ...] --output-dir DIR [--do-normal | --num-tokens N | ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_rl.config import load_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow options (`score F --oracle reward.k=v`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return args.run(args)
    except ValueError as err:  # bad input or config: one clear line, no traceback
        print(f"megatron-rl {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-rl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser("score", help="score model responses with the medical reward modules")
    score.add_argument("parquet", nargs="?", help="prompts and ground truths (verl / Med-U1 parquet schema)")
    score.add_argument("--responses", help='JSONL: {"response": str, "row": int?, "response_num_tokens": int?}')
    score.add_argument("--sample", action="store_true", help="score the built-in sample instead of files")
    score.add_argument("--oracle", action="store_true",
                       help="score each row's own ground truth, well formatted and on budget: the most "
                            "the reward can give this data")
    score.add_argument("--config", help="YAML config (its reward section is used)")
    score.add_argument("--tokenizer", help="HF tokenizer dir to count response tokens where a line has none")
    score.add_argument("--no-length", action="store_true", help="leave the length term out")
    score.add_argument("--output", help="write one JSON object per response with every reward part")
    score.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides, e.g. reward.threshold=50")
    score.set_defaults(run=_score)

    prepare = commands.add_parser("prepare-data", help="raw benchmark files -> train/validation/test parquet")
    prepare.add_argument("--input", nargs="+", required=True, metavar="FILE", help="raw .json, .jsonl or .parquet")
    prepare.add_argument("--output-dir", required=True, metavar="DIR")
    prepare.add_argument("--name", help="output name (one benchmark only; default: the benchmark's)")
    prepare.add_argument("--format", help="benchmark of every input (default: recognised from the content)")
    prepare.add_argument("--split", help="put every input in this split: train, validation or test "
                                          "(default: a record's split field, else the file name)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the length budgets and the mix order")
    prepare.add_argument("--mix-name", default="medoption", help="combined multiple-choice training file name")
    prepare.add_argument("--sample-multiple-for-train", type=int, default=1, metavar="K",
                         help="repeat each training row K times with fresh budgets")
    length = prepare.add_mutually_exclusive_group()
    length.add_argument("--do-normal", action="store_true", help="no length instruction (num_tokens = -1)")
    length.add_argument("--num-tokens", type=int, metavar="N",
                        help="one budget for all: N > 0 'Think for N tokens.', N < 0 a maximum of |N|")
    length.add_argument("--use-log", action="store_true", help="budgets 2^U(8, 14.5)")
    length.add_argument("--use-both", action="store_true", help="half exact budgets in 100..2000, half none")
    length.add_argument("--use-both-both", action="store_true", help="budgets in 100..2000, half of them maxima")
    prepare.set_defaults(run=_prepare_data)
    return parser


def _score(args: argparse.Namespace) -> int:
    from megatron_rl.rewards import report, score_batch
    from megatron_rl.rewards.sample import SAMPLE

    overrides = list(args.overrides)
    if args.parquet and "=" in args.parquet:  # `score reward.k=v` with --sample
        overrides.insert(0, args.parquet)
        args.parquet = None
    config = load_config(args.config, overrides).reward
    if args.sample:
        rows = SAMPLE
    elif args.parquet and args.oracle:
        rows = report.oracle_rows(args.parquet, use_length=not args.no_length)
    elif args.parquet and args.responses:
        count_tokens = _token_counter(args.tokenizer) if args.tokenizer else None
        rows = report.rows_from_files(args.parquet, args.responses, count_tokens=count_tokens,
                                      use_length=not args.no_length)
    else:
        raise ValueError("give FILE.parquet --responses FILE.jsonl, FILE.parquet --oracle, or --sample")
    results = score_batch(rows, config=config)
    if args.sample:
        print(f"{'data_source':<26} {'total':>6} {'format':>6} {'correct':>7} {'length':>6} {'valid':>5}  note")
        for row, result in zip(rows, results):
            print(f"{row['data_source']:<26} {result.total:>6.2f} {result.format:>6.1f} {result.correctness:>7.2f} "
                  f"{result.length:>6.2f} {result.valid:>5}  {row['note']}")
        print()
    print(report.format_summary(report.summarize(rows, results)))
    if args.output:
        report.write_results(args.output, rows, results)
        print(f"wrote {len(results)} scored responses to {args.output}")
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from megatron_rl.data.prepare import LengthMode, PrepareOptions, prepare

    if args.overrides:
        raise ValueError(f"prepare-data takes no config overrides: {' '.join(args.overrides)}")
    if args.do_normal:
        length = LengthMode("normal")
    elif args.num_tokens is not None:
        length = LengthMode("fixed", args.num_tokens)
    elif args.use_log:
        length = LengthMode("log")
    elif args.use_both:
        length = LengthMode("both")
    elif args.use_both_both:
        length = LengthMode("both_both")
    else:
        length = LengthMode("exact")
    options = PrepareOptions(length=length, seed=args.seed, split=args.split, format_name=args.format,
                             name=args.name, mix_name=args.mix_name,
                             sample_multiple_for_train=args.sample_multiple_for_train)
    summary = prepare(args.input, args.output_dir, options)
    print(summary.format())
    print(f"length budgets: {length.mode}; written to {args.output_dir}")
    return 0


def _token_counter(tokenizer_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


if __name__ == "__main__":
    sys.exit(main())
