"""``megatron-rl eval``: sample responses from an HF model on benchmark parquet files, score them
with the reward modules, and summarise (see docs/eval.md).

    summary = run_eval(EvalConfig(model="out/hf", data=("mediq.parquet",), output_dir="eval/"))

Writes ``results.jsonl`` (one line per sample, appended a prompt at a time: a rerun with the same
settings continues where an interrupted one stopped), ``summary.json``, ``summary.md`` and, with
budgets, ``accuracy_vs_budget.png`` into ``output_dir``.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_rl.data.config import PROMPT_TEMPLATES
from megatron_rl.data.dataset import as_messages, prompt_check, render_prompts, tokenize
from megatron_rl.data.schema import PromptRow, read_rows
from megatron_rl.evaluation import metrics, results
from megatron_rl.evaluation.budgets import LENGTH_MODES, budget_num_tokens, with_budget
from megatron_rl.evaluation.looping import find_loop
from megatron_rl.rewards import RewardConfig, score_batch, text
from megatron_rl.rewards.report import reward_row
from megatron_rl.rewards.score import OPEN_ENDED, task_of
from megatron_rl.rollout.base import RolloutEngine, SamplingConfig
from megatron_rl.validation import check_choice, check_range

BACKENDS = ("vllm", "hf")
EVAL_REWARD = RewardConfig(answer_fallback="response")
"""The Med-U1 evaluation's scoring: the training preset, but a response without an <answer> tag is
scored as a whole (its reference evaluation does this)."""

SETTINGS_FILE = "eval_settings.json"


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run. Sampling defaults are Med-U1's evaluation settings."""

    model: str
    """Hugging Face model directory (weights, config, tokenizer)."""
    data: tuple[str, ...]
    """Benchmark parquet files (verl / Med-U1 schema); their file names must differ."""
    output_dir: str
    n: int = 1
    """Samples per prompt (pass@k up to k = n)."""
    budgets: tuple[int | None, ...] = ()
    """Length budgets; each prompt is evaluated once per budget with its length instruction rewritten
    (None: no instruction). Empty: prompts keep the instruction they have."""
    length_mode: str = "exact"
    """'exact' ("Think for N tokens.") or 'max' ("Think for maximum N tokens.") for the budgets."""
    backend: str = "vllm"
    """'vllm' (default) or 'hf' (transformers generate, the slow fallback)."""
    temperature: float = 0.2
    top_p: float = 0.95
    max_tokens: int = 2048
    seed: int = 0
    """Sample j of prompt i (in run order) uses seed + i * n + j: reruns and resumes draw alike."""
    limit: int | None = None
    """Evaluate only the first ``limit`` rows of each file."""
    batch_size: int = 64
    """Prompts per generate call (each with n samples)."""
    max_model_len: int | None = None
    """Prompt + response tokens the engine allows; None: the model's max_position_embeddings.
    Prompts longer than ``max_model_len - max_tokens`` are skipped and counted in the summary."""
    prompt_template: str = "row"
    """'row': a prompt rendered by a chat template already is used as it is; 'model': every prompt
    goes through the model's own chat template (see ``data.prompt_template``, megatron_rl.data.config)."""
    reward: RewardConfig = field(default_factory=lambda: EVAL_REWARD)

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("eval.data is empty; give at least one parquet file")
        stems = [Path(p).stem for p in self.data]
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if duplicates:
            raise ValueError(f"eval.data has several files named {duplicates}: example ids use the file name")
        check_range("eval.n", self.n, low=1, integer=True)
        for budget in self.budgets:
            budget_num_tokens(budget, self.length_mode)  # checks each budget and the mode
        check_choice("eval.length_mode", self.length_mode, LENGTH_MODES)
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"eval.budgets={list(self.budgets)} repeats a budget")
        check_choice("eval.backend", self.backend, BACKENDS)
        SamplingConfig(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                       seed=self.seed)  # checks the sampling fields
        if self.limit is not None:
            check_range("eval.limit", self.limit, low=1, integer=True)
        check_range("eval.batch_size", self.batch_size, low=1, integer=True)
        if self.max_model_len is not None:
            check_range("eval.max_model_len", self.max_model_len, low=self.max_tokens + 1, integer=True)
        check_choice("eval.prompt_template", self.prompt_template, PROMPT_TEMPLATES)

    def settings(self) -> dict:
        """What determines the results (a resumed run must match it): everything but where and how fast."""
        return {"model": str(Path(self.model).resolve()), "data": [str(Path(p).resolve()) for p in self.data],
                "n": self.n, "budgets": list(self.budgets), "length_mode": self.length_mode, "backend": self.backend,
                "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": self.seed, "reward": asdict(self.reward),
                **({"prompt_template": self.prompt_template} if self.prompt_template != "row" else {})}


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to generate for: a row at one budget, rendered and tokenised."""

    id: str  # "<file stem>/<row index>"
    file: str
    row_index: int
    budget: int | None
    row: PromptRow
    text: str
    token_ids: tuple[int, ...]

    @property
    def key(self) -> results.PromptKey:
        return self.id, self.budget


def build_prompts(config: EvalConfig, tokenizer) -> list[EvalPrompt]:
    """Every (row, budget) prompt in run order: file by file, row by row, budget by budget."""
    entries = []
    check = prompt_check(tokenizer, config.prompt_template)
    for path in config.data:
        rows, _ = read_rows(path, check=check)
        if config.prompt_template == "model":
            rows = [as_messages(row) for row in rows]
        for index, row in enumerate(rows[: config.limit]):
            where = f"{path}: row {index}"
            for budget in config.budgets or (None,):
                if config.budgets:
                    row_at_budget = with_budget(row, budget_num_tokens(budget, config.length_mode), where=where)
                else:
                    row_at_budget = row
                entries.append((f"{Path(path).stem}/{index}", str(path), index, budget, row_at_budget))
    texts = render_prompts([entry[-1] for entry in entries], tokenizer)
    token_ids = tokenize(texts, tokenizer)
    return [EvalPrompt(*entry, text, tuple(ids)) for entry, text, ids in zip(entries, texts, token_ids, strict=True)]


def score_prompt(prompt: EvalPrompt, rollouts, reward: RewardConfig) -> list[dict]:
    """The ``results.jsonl`` records of one prompt's samples: response, extracted answer, 0/1 score,
    reward, whether the format is valid (the reward's format part is positive), token count, the
    loop that ends the response (``loop_period`` / ``loop_tokens``, None / 0 without one;
    :func:`megatron_rl.evaluation.looping.find_loop`), and EMS / ROUGE-L (0-100) of the answer for
    open-ended benchmarks."""
    row = prompt.row
    reward_rows = [reward_row(row, r.text, len(r.token_ids)) for r in rollouts]
    open_ended = task_of(row.data_source) == OPEN_ENDED
    records = []
    for rollout, result in zip(rollouts, score_batch(reward_rows, config=reward), strict=True):
        answer = result.answer or ""
        loop = find_loop(rollout.token_ids)
        records.append({
            "id": prompt.id, "file": prompt.file, "row": prompt.row_index, "data_source": row.data_source,
            "budget": prompt.budget, "num_tokens": row.num_tokens, "sample_index": rollout.sample_index,
            "prompt": prompt.text, "response": rollout.text, "answer": result.answer,
            "ground_truth": row.ground_truth, "lower_limit": row.lower_limit, "upper_limit": row.upper_limit,
            "score": result.valid, "reward": result.total, "format_valid": result.format > 0,
            "ems": text.ems(answer, row.ground_truth) if open_ended else None,
            "rouge_l": text.rouge_l(answer, row.ground_truth) if open_ended else None,
            "response_num_tokens": len(rollout.token_ids), "finish_reason": rollout.finish_reason,
            "loop_period": loop.period if loop else None, "loop_tokens": loop.num_tokens if loop else 0,
        })  # fmt: skip
    return records


def contiguous_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split sorted prompt indices into runs of consecutive indices of at most ``batch_size``: each
    run is one generate call whose seeds follow the prompts' global positions."""
    batches: list[list[int]] = []
    for index in indices:
        if batches and batches[-1][-1] == index - 1 and len(batches[-1]) < batch_size:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def run_eval(config: EvalConfig, engine: RolloutEngine | None = None, *, progress: bool = True) -> dict:
    """Generate what ``output_dir/results.jsonl`` lacks, then write the summary files; returns the summary.

    ``engine``: an engine to use (and leave open); None builds the ``backend``'s engine when anything
    remains to generate, and closes it afterwards.

    Raises:
        ValueError: bad data or settings, or ``output_dir`` holds results made with other settings.
    """
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    out = Path(config.output_dir)
    # Never the model directory's own code (config.json "auto_map"), and no prompt asking to run it.
    tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=False)
    max_model_len = config.max_model_len or AutoConfig.from_pretrained(
        config.model, trust_remote_code=False).max_position_embeddings
    prompts = build_prompts(config, tokenizer)
    too_long = [p for p in prompts if len(p.token_ids) + config.max_tokens > max_model_len]
    if too_long:
        print(f"eval: skipping {len(too_long)} of {len(prompts)} prompts longer than max_model_len - max_tokens = "
              f"{max_model_len - config.max_tokens} tokens (first: {too_long[0].id})", file=sys.stderr)
    skipped = {p.key for p in too_long}
    prompts = [p for p in prompts if p.key not in skipped]
    path = out / "results.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out / SETTINGS_FILE, config.settings(), has_results=path.is_file() and path.stat().st_size > 0)
    done = results.load_completed(path, config.n)
    todo = [i for i, p in enumerate(prompts) if p.key not in done]
    own_engine = engine is None and bool(todo)
    if own_engine:  # the engine needs room for the longest prompt left and its response, no more
        needed = max(len(prompts[i].token_ids) for i in todo) + config.max_tokens
        engine = make_engine(config, min(max_model_len, needed))
    try:
        with tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt", desc="eval",
                  disable=not progress) as bar:
            for batch in contiguous_batches(todo, config.batch_size):
                sampling = SamplingConfig(n=config.n, temperature=config.temperature, top_p=config.top_p,
                                          max_tokens=config.max_tokens, seed=config.seed + batch[0] * config.n)
                rollouts = generate_with_progress(engine, [list(prompts[i].token_ids) for i in batch], sampling,
                                                  on_prompt_done=lambda: bar.update(1))
                for offset, i in enumerate(batch):
                    group = rollouts[offset * config.n:(offset + 1) * config.n]
                    results.append_prompt(path, score_prompt(prompts[i], group, config.reward))
    finally:
        if own_engine:
            engine.close()
    return write_summary(config, path, skipped_too_long=len(too_long), kept={p.key for p in prompts})


def generate_with_progress(engine: RolloutEngine, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                           on_prompt_done: Callable[[], None]) -> list:
    """``engine.generate``, calling ``on_prompt_done()`` as each prompt's samples are finished (engines
    whose ``generate`` takes ``on_prompt_done``: vLLM's and transformers'), or once per prompt after the
    call (any other engine)."""
    if "on_prompt_done" in inspect.signature(engine.generate).parameters:
        return engine.generate(prompt_token_ids, sampling, on_prompt_done=on_prompt_done)
    rollouts = engine.generate(prompt_token_ids, sampling)
    for _ in prompt_token_ids:
        on_prompt_done()
    return rollouts


def make_engine(config: EvalConfig, max_model_len: int) -> RolloutEngine:
    """The ``backend``'s rollout engine for ``config.model``."""
    if config.backend == "hf":
        from megatron_rl.rollout.hf_engine import TransformersEngine

        return TransformersEngine(config.model)
    # As in training (megatron_rl/console.py): vLLM's INFO lines would run through the progress bar.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(config.model, max_model_len=max_model_len, seed=config.seed)


def write_summary(config: EvalConfig, results_path: Path, *, skipped_too_long: int = 0,
                  kept: set | None = None) -> dict:
    """Summarise ``results_path`` (the records of the prompts in ``kept``; all when None) into
    summary.json, summary.md and, with budgets, accuracy_vs_budget.png beside it."""
    out = results_path.parent
    records = [r for rs in results.load_completed(results_path, config.n).values() for r in rs
               if kept is None or results.prompt_key(r) in kept]
    rows = metrics.summarize(records, config.n)
    summary = {"settings": config.settings(), "skipped_too_long": skipped_too_long, "benchmarks": rows}
    results.write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    header = (f"# Evaluation of {config.model}\n\n{config.n} sample(s) per prompt, temperature {config.temperature}, "
              f"top_p {config.top_p}, max_tokens {config.max_tokens}, backend {config.backend}"
              + (f", {config.length_mode} budgets {list(config.budgets)}" if config.budgets else "")
              + (f"; {skipped_too_long} prompt(s) skipped as too long" if skipped_too_long else "") + ".\n\n")
    results.write_atomic(out / "summary.md", header + metrics.format_markdown(rows, config.n) + "\n")
    if config.budgets:
        from megatron_rl.evaluation.plot import plot_budgets

        plot_budgets(rows, out / "accuracy_vs_budget.png", length_mode=config.length_mode)
    return summary


def _check_settings(path: Path, settings: dict, *, has_results: bool) -> None:
    """Record the run's settings. Results made with other settings (or with none recorded) are refused
    before anything touches them: mixing them would make the summary meaningless."""
    if has_results:
        if not path.is_file():
            raise ValueError(f"{path.parent} holds results.jsonl but no {path.name}: results of unknown settings; "
                             "use a new --output-dir")
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != settings:
            changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
            raise ValueError(f"{path.parent} holds results of other settings ({', '.join(changed)} differ); "
                             "use a new --output-dir or the same settings to resume")
        return
    results.write_atomic(path, json.dumps(settings, indent=2) + "\n")
