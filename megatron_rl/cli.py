"""The ``megatron-rl`` command: one subcommand per job.

    megatron-rl score FILE.parquet --responses FILE.jsonl [--config CFG.yaml] [reward.k=v ...]
    megatron-rl score FILE.parquet --oracle
    megatron-rl score --sample
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


def _token_counter(tokenizer_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


if __name__ == "__main__":
    sys.exit(main())
