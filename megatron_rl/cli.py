"""The ``megatron-rl`` command: one subcommand per job.

    megatron-rl train CONFIG.yaml [--resume auto|never] [section.key=value ...]
    megatron-rl score FILE.parquet --responses FILE.jsonl [--config CFG.yaml] [reward.k=v ...]
    megatron-rl score FILE.parquet --oracle
    megatron-rl score --sample
    megatron-rl prepare-data --input RAW [RAW ...] --output-dir DIR [--do-normal | --num-tokens N | ...]
    megatron-rl make-tasks --output-dir DIR [--difficulty easy|standard]
    megatron-rl convert hf-to-megatron HF_DIR OUT_DIR --tp N --pp M | megatron-to-hf CKPT_DIR OUT_DIR
    megatron-rl eval --model HF_DIR --data FILE [FILE ...] --output-dir OUT
    megatron-rl plot RUN_DIR
    megatron-rl plan CONFIG.yaml --gpus N [--gpu-memory-gib 80] [--device gpu|cpu] [--json] [section.key=value ...]
    megatron-rl fetch-model smollm2-135m-instruct [--output-dir DIR] [--dtype float32|bfloat16]

Every command takes ``--verbose`` (anywhere; or MEGATRON_RL_VERBOSE=1): the libraries' known-harmless
warnings, filtered otherwise (megatron_rl/console.py), are shown too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_rl import console

VERBOSE_FLAG = "--verbose"
"""Anywhere on the command line: show every library's warnings (megatron_rl/console.py filters the
known-harmless ones otherwise); MEGATRON_RL_VERBOSE=1 does the same."""


def load_config(*args, **kwargs):
    """``megatron_rl.config.load_config``, imported on first use: the config pulls in torch and
    Megatron, which must come after :func:`megatron_rl.console.install`."""
    from megatron_rl.config import load_config as load

    return load(*args, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv
    argv = [item for item in argv if item != VERBOSE_FLAG]
    console.install(verbose=True if verbose else None)  # before torch, Megatron and vLLM are imported
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
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="show the libraries' known-harmless warnings too (also after COMMAND; "
                             "or MEGATRON_RL_VERBOSE=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="GRPO training run (examples/quickstart.yaml runs on CPU in minutes)")
    train.add_argument("config", metavar="CONFIG", help="YAML recipe, e.g. examples/quickstart.yaml")
    train.add_argument("--resume", choices=("auto", "never"), help="same as trainer.resume=...")
    train.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides, e.g. trainer.output_dir=runs/a trainer.total_steps=20")
    train.set_defaults(run=_train)

    plan = commands.add_parser("plan", help="memory per rank and phase of a run, from config.json alone "
                                            "(exit 0: it fits, 3: it does not)")
    plan.add_argument("config", metavar="CONFIG", help="YAML recipe, e.g. examples/medu1_qwen2.5_3b.yaml")
    plan.add_argument("--gpus", type=int, required=True, metavar="N", help="processes of the run (one per GPU)")
    plan.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                      help="memory per GPU (--device cpu: the host's RAM); default memory.device_memory_gib, "
                           "else 80 (GPU) or this host's available RAM (CPU)")
    plan.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="plan for GPUs (bf16) or the CPU")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    plan.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                      help="config overrides, e.g. model.path=/models/Qwen2.5-7B-Instruct model.recompute=full")
    plan.set_defaults(run=_plan)

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

    tasks = commands.add_parser("make-tasks", help="generate the built-in calculation tasks (train/test parquet)")
    tasks.add_argument("--output-dir", required=True, metavar="DIR")
    tasks.add_argument("--num-train", type=int, default=512, metavar="N")
    tasks.add_argument("--num-test", type=int, default=64, metavar="N")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--kinds", nargs="+", default=["calc", "choice"], help="calc and/or choice")
    tasks.add_argument("--difficulty", default="easy", help="easy (tiny-model quickstart) or standard (Med-U1 prompts)")
    tasks.set_defaults(run=_make_tasks)

    plot = commands.add_parser("plot", help="plot RUN_DIR/metrics.jsonl to RUN_DIR/reward.png")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--output", help="PNG path (default: RUN_DIR/reward.png)")
    plot.set_defaults(run=_plot)

    evaluate = commands.add_parser("eval", help="sample and score an HF model on benchmark parquet files")
    evaluate.add_argument("--model", required=True, metavar="HF_DIR", help="Hugging Face model directory")
    evaluate.add_argument("--data", nargs="+", required=True, metavar="FILE", help="benchmark parquet files")
    evaluate.add_argument("--output-dir", required=True, metavar="OUT",
                          help="results.jsonl, summary.json/.md, accuracy_vs_budget.png; a rerun resumes here")
    evaluate.add_argument("--n", type=int, default=1, metavar="K", help="samples per prompt (pass@k up to K)")
    evaluate.add_argument("--budgets", metavar="B,B,...",
                          help="length budgets, e.g. 512,1024,2048,3600 ('none': no length instruction)")
    evaluate.add_argument("--length-mode", default="exact", help="exact or max (budget instruction wording)")
    evaluate.add_argument("--backend", default="vllm", help="vllm (default) or hf (transformers fallback)")
    evaluate.add_argument("--temperature", type=float, default=0.2)
    evaluate.add_argument("--top-p", type=float, default=0.95)
    evaluate.add_argument("--max-tokens", type=int, default=2048)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--limit", type=int, metavar="N", help="only the first N rows of each file")
    evaluate.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    evaluate.add_argument("--max-model-len", type=int, help="default: the model's max_position_embeddings")
    evaluate.add_argument("--prompt-template", default="row", choices=("row", "model"),
                          help="row: prompts rendered by a chat template are used as stored; model: every "
                               "prompt through the model's own chat template (see data.prompt_template)")
    evaluate.set_defaults(run=_eval)

    convert = commands.add_parser("convert", help="HF model <-> Megatron checkpoint (any TP/PP), streaming")
    direction = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_megatron = direction.add_parser("hf-to-megatron", help="HF_DIR -> Megatron checkpoint directory")
    to_megatron.add_argument("source", metavar="HF_DIR")
    to_megatron.add_argument("out_dir", metavar="OUT_DIR", help="must not exist; written atomically")
    to_megatron.add_argument("--tp", type=int, default=1, help="tensor-parallel size to lay the shards out for")
    to_megatron.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (must divide the layers)")
    to_megatron.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="cast (default: keep the input's)")
    to_megatron.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N")
    to_hf = direction.add_parser("megatron-to-hf", help="Megatron checkpoint directory -> HF_DIR")
    to_hf.add_argument("source", metavar="CKPT_DIR")
    to_hf.add_argument("out_dir", metavar="OUT_DIR", help="must not exist; written atomically")
    to_hf.add_argument("--hf-config-from", metavar="HF_DIR", help="config.json + tokenizer (default: CKPT_DIR's)")
    to_hf.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="cast (default: keep the checkpoint's)")
    to_hf.add_argument("--max-shard-size-mb", type=int, default=5 * 1024, metavar="MB")
    for sub in (to_megatron, to_hf):
        sub.add_argument("--verify", action="store_true",
                         help="compare Megatron (TP=1, CPU) and transformers logits on a fixed input")
        sub.set_defaults(run=_convert)

    fetch = commands.add_parser("fetch-model", help="download a known real model and write it as an HF directory")
    fetch.add_argument("name", metavar="NAME", help="smollm2-135m-instruct (see docs/models.md)")
    fetch.add_argument("--output-dir", metavar="DIR",
                       help="also copy it here (default: only the cache, $MEGATRON_RL_CACHE or ~/.cache/megatron-rl)")
    fetch.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight dtype")
    fetch.set_defaults(run=_fetch_model)
    return parser


def _train(args: argparse.Namespace) -> int:
    from megatron_rl.trainer.loop import train

    overrides = list(args.overrides) + ([f"trainer.resume={args.resume}"] if args.resume else [])
    config = load_config(args.config, overrides)
    train(config)
    return 0


PLAN_DOES_NOT_FIT = 3
"""Exit status of ``megatron-rl plan`` when the run does not fit."""


def _plan(args: argparse.Namespace) -> int:
    from megatron_rl.memory.plan import GIB, hf_config_for, plan_json, plan_run

    config = load_config(args.config, args.overrides)
    if args.gpus < 1:
        raise ValueError(f"--gpus={args.gpus} must be >= 1")
    device_bytes = int(args.gpu_memory_gib * GIB) if args.gpu_memory_gib else None
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory-gib={args.gpu_memory_gib} must be > 0")
    plan = plan_run(config, hf_config_for(config), num_gpus=args.gpus, device=args.device, device_bytes=device_bytes)
    if args.json:
        print(plan_json(plan))
    else:
        print(plan.table())
        if not plan.fits:
            print()
            print(plan.refusal())
    return 0 if plan.fits else PLAN_DOES_NOT_FIT


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

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)  # never the dir's own code
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _make_tasks(args: argparse.Namespace) -> int:
    from megatron_rl.data.builtin import make_tasks

    if args.overrides:
        raise ValueError(f"make-tasks takes no config overrides: {' '.join(args.overrides)}")
    paths = make_tasks(args.output_dir, num_train=args.num_train, num_test=args.num_test, seed=args.seed,
                       kinds=args.kinds, difficulty=args.difficulty)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from megatron_rl.trainer.plot import plot_run

    if args.overrides:
        raise ValueError(f"plot takes no config overrides: {' '.join(args.overrides)}")
    print(plot_run(args.run_dir, args.output))
    return 0



def _eval(args: argparse.Namespace) -> int:
    from megatron_rl.evaluation import EvalConfig, run_eval
    from megatron_rl.evaluation.metrics import format_markdown

    # The evaluation scores a response without <answer> tags as a whole; reward.k=v overrides still apply.
    reward = load_config(None, ["reward.answer_fallback=response", *args.overrides]).reward
    config = EvalConfig(
        model=args.model, data=tuple(args.data), output_dir=args.output_dir, n=args.n,
        budgets=_budgets(args.budgets), length_mode=args.length_mode, backend=args.backend,
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed, limit=args.limit,
        batch_size=args.batch_size, max_model_len=args.max_model_len, prompt_template=args.prompt_template,
        reward=reward,
    )  # fmt: skip
    summary = run_eval(config)
    print(format_markdown(summary["benchmarks"], config.n))
    print(f"wrote results.jsonl, summary.json and summary.md to {args.output_dir}")
    return 0


def _budgets(text: str | None) -> tuple[int | None, ...]:
    """'512,1024' -> (512, 1024); 'none' -> None (no length instruction)."""
    if not text:
        return ()
    budgets = []
    for item in text.split(","):
        item = item.strip().lower()
        if item == "none":
            budgets.append(None)
        elif item.isdigit() and int(item) > 0:
            budgets.append(int(item))
        else:
            raise ValueError(f"--budgets item {item!r} must be a positive integer or 'none'")
    return tuple(budgets)


def _fetch_model(args: argparse.Namespace) -> int:
    from megatron_rl.models import FetchError, copy_model, fetch_model

    if args.overrides:
        raise ValueError(f"fetch-model takes no config overrides: {' '.join(args.overrides)}")
    try:
        result = fetch_model(args.name, dtype=args.dtype)
        if args.output_dir:
            result = copy_model(result.path, args.output_dir, args.name, args.dtype)
    except (FetchError, FileExistsError) as err:  # no network, a checksum, an existing --output-dir: one line
        raise ValueError(str(err)) from err
    print(f"{args.name} ({args.dtype}): {result.path}" + (" (already there)" if result.reused else ""))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from megatron_rl.checkpoint.convert import hf_to_megatron, megatron_to_hf

    if args.overrides:
        raise ValueError(f"convert takes no config overrides: {' '.join(args.overrides)}")
    try:
        if args.direction == "hf-to-megatron":
            result = hf_to_megatron(args.source, args.out_dir, args.tp, args.pp, dtype=args.dtype, verify=args.verify,
                                    make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        else:
            result = megatron_to_hf(args.source, args.out_dir, hf_config_from=args.hf_config_from, dtype=args.dtype,
                                    max_shard_bytes=args.max_shard_size_mb * 1024**2, verify=args.verify)
    except (OSError, KeyError) as err:  # missing / corrupted input, existing output: one clear line too
        raise ValueError(err.args[0] if isinstance(err, KeyError) and err.args else str(err)) from err
    print(f"wrote {result.num_tensors} tensors ({result.num_bytes / 1e6:.1f} MB) to {result.out_dir}")
    if result.max_logit_diff is not None:
        print(f"verify: max |logit diff| Megatron vs transformers = {result.max_logit_diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
