"""The phases of a step that run on the rollout engine's rank (generate, score, validate), the
SFT warm-up, and writing models out. Each takes the :class:`~megatron_rl.trainer.loop.Trainer`."""

from __future__ import annotations

import logging
import random
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_rl.config import to_yaml
from megatron_rl.data.dataset import PromptExample, tokenize
from megatron_rl.evaluation.metrics import pass_at_k, pass_ks
from megatron_rl.jsonl import append_records
from megatron_rl.megatron.parallel import barrier
from megatron_rl.rewards import RewardResult, report, score_batch
from megatron_rl.rewards.report import reward_row
from megatron_rl.rollout.base import Rollout, SamplingConfig
from megatron_rl.trainer.batch import RolloutBatch, make_micro_batches, pack_rollouts
from megatron_rl.trainer.metrics import GENERATIONS_FILE, PhaseTimer

if TYPE_CHECKING:
    from megatron_rl.trainer.loop import Trainer

log = logging.getLogger(__name__)

SFT_MODEL = "sft_model"
"""RUN_DIR/sft_model: the model after the SFT warm-up (HF), the start of RL and its reference."""


def generate_and_score(tr: Trainer, step: int, timer: PhaseTimer) -> tuple[RolloutBatch, dict[str, float]]:
    """Sample this replica's prompts, generate ``n`` responses each, score them; with dynamic
    sampling, keep only groups whose rewards differ and sample more prompts until the batch is full.

    ``sampling/equal_reward_groups`` counts the groups (of every sampling round) whose ``n`` rewards
    are all equal: their advantages are 0, they teach nothing. When every group of the batch is such
    a group a warning says so (:func:`_warn_if_nothing_to_learn`). A few responses are written to
    RUN_DIR/generations.jsonl (:func:`_log_generations`)."""
    cfg = tr.cfg
    if cfg.trainer.replay_rollouts:
        prompts, rollouts = _replay(tr, step)
        with timer("score"):
            results = _score(tr, prompts, rollouts)
        equal = _warn_if_nothing_to_learn(tr, step, [r.total for r in results])
        _log_generations(tr, step, prompts, rollouts, results)
        batch, metrics = _finish(tr, prompts, rollouts, results)
        return batch, {**metrics, "sampling/equal_reward_groups": float(equal)}
    alg, n = cfg.algorithm, cfg.rollout.n
    kept_prompts: list[PromptExample] = []
    kept_rollouts: list[Rollout] = []
    kept_results: list[RewardResult] = []
    dropped: list[tuple[PromptExample, list[Rollout], list[RewardResult]]] = []
    want = cfg.data.batch_size // tr.info.dp_size
    rounds = equal_groups = 0
    while len(kept_prompts) < want and rounds < alg.max_sampling_rounds:
        prompts = tr.local_prompts(next(iter(tr.sampler)))
        sampling = SamplingConfig(n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_response_length,
                                  seed=_sampling_seed(tr, step, rounds, len(prompts) * n))
        with timer("generate"):
            rollouts = tr.engine.generate([list(p.prompt_token_ids) for p in prompts], sampling)
        with timer("score"):
            results = _score(tr, prompts, rollouts)
        rounds += 1
        for index, prompt in enumerate(prompts):
            group = rollouts[index * n : (index + 1) * n]
            group_results = results[index * n : (index + 1) * n]
            equal = len({r.total for r in group_results}) == 1
            equal_groups += equal
            if alg.dynamic_sampling and equal:
                dropped.append((prompt, group, group_results))
                continue
            if len(kept_prompts) < want:
                _append_group(kept_prompts, kept_rollouts, kept_results, prompt, group, group_results)
        if not alg.dynamic_sampling:
            break
    fill = want - len(kept_prompts)  # dynamic sampling ran out of rounds: equal-reward groups fill the rest
    for prompt, group, group_results in dropped[:fill]:
        _append_group(kept_prompts, kept_rollouts, kept_results, prompt, group, group_results)
    if tr.cfg.trainer.rollout_only:
        _save_rollouts(tr, step, kept_prompts, kept_rollouts, kept_results)
    _warn_if_nothing_to_learn(tr, step, [r.total for r in kept_results])
    _log_generations(tr, step, kept_prompts, kept_rollouts, kept_results)
    metrics_extra = {"sampling/rounds": float(rounds), "sampling/equal_reward_groups": float(equal_groups)}
    batch, metrics = _finish(tr, kept_prompts, kept_rollouts, kept_results)
    return batch, {**metrics, **metrics_extra}


def equal_reward_groups(rewards: Sequence[float], n: int) -> int:
    """How many of the groups of ``n`` consecutive rewards (one prompt's responses) are all equal."""
    return sum(len(set(rewards[i : i + n])) == 1 for i in range(0, len(rewards), n))


def _warn_if_nothing_to_learn(tr: Trainer, step: int, rewards: Sequence[float]) -> int:
    """Warn (rank 0) when every group of the batch ``rewards`` (this replica's; groups of rollout.n)
    has equal rewards: every advantage is 0, so the step costs a full update and moves the policy only
    through the KL and entropy terms (not at all without them). Returns the number of such groups."""
    n = tr.cfg.rollout.n
    equal = equal_reward_groups(rewards, n)
    alg = tr.cfg.algorithm
    outcome_only = alg.advantage != "gae" and not alg.kl_in_reward  # else values / KL make advantages differ
    if tr.is_main and rewards and equal == len(rewards) // n and not tr.cfg.trainer.rollout_only and outcome_only:
        effect = ("only through the KL and entropy terms" if alg.kl_coef or alg.entropy_coef else "not at all")
        values = sorted(set(rewards))
        shown = (f"every reward is {values[0]:g}" if len(values) == 1
                 else "rewards " + ", ".join(f"{v:g}" for v in values[:4]))
        log.warning("step %d: each of the %d groups has equal rewards (%s), so every advantage is 0: the update "
                    "costs a full step and changes the policy %s. If the model does not write the answer format "
                    "yet, trainer.sft_warmup_steps teaches it (RUN_DIR/generations.jsonl shows what it writes).",
                    step, len(rewards) // n, shown, effect)
    return equal


def _log_generations(tr: Trainer, step: int, prompts, rollouts: Sequence[Rollout], results) -> None:
    """Append ``trainer.log_generations`` of this step's responses to RUN_DIR/generations.jsonl (rank
    0): sample 0 of the first prompts, then sample 1, ...; with the prompt, the reward and its parts.
    A resumed run drops the lines of the steps it runs again (Trainer._drop_records_after)."""
    count = tr.cfg.trainer.log_generations
    if not tr.is_main or count == 0:
        return
    chosen = sorted(range(len(rollouts)), key=lambda i: (rollouts[i].sample_index, rollouts[i].prompt_index))[:count]
    records = []
    for i in chosen:
        rollout, result = rollouts[i], results[i]
        prompt = prompts[rollout.prompt_index]
        records.append({
            "step": step, "file": Path(prompt.file).name, "row_index": prompt.row_index,
            "data_source": prompt.row.data_source, "sample_index": rollout.sample_index, "prompt": prompt.prompt_text,
            "response": rollout.text, "reward": result.total, "format": result.format,
            "correctness": result.correctness, "length": result.length, "answer": result.answer,
            "ground_truth": prompt.row.ground_truth, "response_num_tokens": len(rollout.token_ids),
            "finish_reason": rollout.finish_reason,
        })  # fmt: skip
    append_records(tr.run_dir / GENERATIONS_FILE, records)


def _append_group(prompts, rollouts, results, prompt, group: Sequence[Rollout], group_results) -> None:
    index = len(prompts)
    prompts.append(prompt)
    rollouts.extend(Rollout(index, r.sample_index, r.token_ids, r.text, r.logprobs, r.finish_reason) for r in group)
    results.extend(group_results)


def _sampling_seed(tr: Trainer, step: int, round_index: int, width: int) -> int:
    """A seed per (run seed, step, sampling round, DP rank); request j then uses seed + j."""
    slot = ((tr.cfg.trainer.seed * 100_003 + step) * 16 + round_index) * 1024 + tr.info.dp_rank
    return slot * width


def _score(tr: Trainer, prompts: Sequence[PromptExample], rollouts: Sequence[Rollout]) -> list[RewardResult]:
    rows = [reward_row(prompts[r.prompt_index].row, r.text, len(r.token_ids)) for r in rollouts]
    return score_batch(rows, config=tr.cfg.reward)


def _per_source(prompts, rollouts, results: Sequence[RewardResult]) -> tuple[dict, dict]:
    """(statistics of every response, {data_source: statistics}) from ``rewards.report.summarize``."""
    summary = report.summarize([{"data_source": prompts[r.prompt_index].row.data_source} for r in rollouts], results)
    overall = summary.pop("all", None)
    return overall or next(iter(summary.values())), summary


def _finish(tr: Trainer, prompts, rollouts, results) -> tuple[RolloutBatch, dict[str, float]]:
    pad_id = tr.tokenizer.pad_token_id if tr.tokenizer.pad_token_id is not None else tr.tokenizer.eos_token_id
    batch = pack_rollouts([p.prompt_token_ids for p in prompts], rollouts, [r.total for r in results], pad_id=pad_id)
    return batch, reward_metrics(prompts, rollouts, results, batch)


def reward_metrics(prompts, rollouts, results: Sequence[RewardResult], batch: RolloutBatch) -> dict[str, float]:
    """Reward mean/std and each part's mean, accuracy per data source, response lengths."""
    totals = torch.tensor([r.total for r in results], dtype=torch.float64)
    overall, by_source = _per_source(prompts, rollouts, results)
    metrics = {"reward/mean": overall["reward"], "reward/std": float(totals.std()) if len(totals) > 1 else 0.0,
               **{f"reward/{part}/mean": overall[part] for part in ("format", "correctness", "length")},
               **{f"acc/{source}": stats["accuracy"] for source, stats in by_source.items()},
               "acc/all": overall["accuracy"]}
    lengths = batch.response_lengths.double()
    metrics.update({"response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
                    "response_length/clip_ratio": float(batch.truncated.double().mean())})
    return metrics


def validate(tr: Trainer) -> dict[str, float]:
    """``rollout.val_n`` answers to each validation prompt at ``rollout.val_temperature`` (greedy by
    default; top_p 1, no top_k, as verl samples validation), scored. Means over every answer, as
    verl's: ``val/test_acc/<source>`` (the 0/1 validation score), ``val/test_score/<source>`` (the
    reward), ``val/test_acc/all``, ``val/response_length/mean``; with val_n > 1 also the unbiased
    ``val/pass@k/<source>`` and ``val/pass@k/all`` (mean over prompts) for k = 2, 4, ... and val_n
    (pass@1 is test_acc)."""
    cfg = tr.cfg
    n = cfg.rollout.val_n
    examples = tr.val_set.examples[: cfg.trainer.val_limit or None]
    sampling = SamplingConfig(n=n, temperature=cfg.rollout.val_temperature, max_tokens=cfg.rollout.max_response_length,
                              seed=cfg.trainer.seed)
    rollouts = tr.engine.generate([list(e.prompt_token_ids) for e in examples], sampling)
    results = _score(tr, examples, rollouts)
    overall, by_source = _per_source(examples, rollouts, results)
    metrics = {}
    for source, stats in by_source.items():
        metrics[f"val/test_acc/{source}"] = stats["accuracy"]
        metrics[f"val/test_score/{source}"] = stats["reward"]
    metrics["val/test_acc/all"] = overall["accuracy"]
    metrics["val/response_length/mean"] = sum(len(r.token_ids) for r in rollouts) / len(rollouts)
    if n > 1:
        correct: dict[str, list[int]] = defaultdict(list)  # data source -> correct answers of each prompt
        for index, example in enumerate(examples):  # rollouts[index * n + j]: answer j of prompt index
            correct[example.row.data_source].append(sum(r.valid for r in results[index * n : (index + 1) * n]))
        groups = {**correct, "all": [c for counts in correct.values() for c in counts]}
        for k in pass_ks(n)[1:]:
            for source, counts in groups.items():
                metrics[f"val/pass@{k}/{source}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    return metrics


# ---------------------------------------------------------------------- debug modes


def _save_rollouts(tr: Trainer, step: int, prompts, rollouts, results) -> None:
    """Rollout-only mode: append this step's responses to RUN_DIR/rollouts.jsonl (rank 0)."""
    if not tr.is_main:
        return
    append_records(tr.rollout_file, [{
        "step": step, "file": Path(prompts[r.prompt_index].file).name, "row_index": prompts[r.prompt_index].row_index,
        "prompt_token_ids": list(prompts[r.prompt_index].prompt_token_ids), "prompt_index": r.prompt_index,
        "sample_index": r.sample_index, "token_ids": list(r.token_ids), "logprobs": list(r.logprobs),
        "finish_reason": r.finish_reason, "text": r.text, "reward": result.total,
    } for r, result in zip(rollouts, results, strict=True)])


def _replay(tr: Trainer, step: int) -> tuple[list[PromptExample], list[Rollout]]:
    """Train-only mode: the rollouts that rollout-only mode saved for ``step`` (rescored)."""
    from megatron_rl.trainer.metrics import read_metrics

    records = [r for r in read_metrics(tr.cfg.trainer.replay_rollouts) if r.get("step") == step]
    if not records:
        raise ValueError(f"trainer.replay_rollouts={tr.cfg.trainer.replay_rollouts!r} holds no rollouts of step {step}")
    by_key = {(Path(e.file).name, e.row_index): e for e in tr.train_set.examples}
    prompts: list[PromptExample] = []
    index_of: dict[int, int] = {}
    rollouts = []
    for record in sorted(records, key=lambda r: (r["prompt_index"], r["sample_index"])):
        key = (record["file"], record["row_index"])
        if key not in by_key or list(by_key[key].prompt_token_ids) != record["prompt_token_ids"]:
            raise ValueError(f"replayed rollout of step {step} names row {record['row_index']} of {record['file']!r}, "
                             "which this run's training data does not hold (or holds with another prompt)")
        if record["prompt_index"] not in index_of:
            index_of[record["prompt_index"]] = len(prompts)
            prompts.append(by_key[key])
        rollouts.append(Rollout(index_of[record["prompt_index"]], record["sample_index"], tuple(record["token_ids"]),
                                record["text"], tuple(record["logprobs"]), record["finish_reason"]))
    n = tr.cfg.rollout.n
    samples: list[list[int]] = [[] for _ in prompts]
    for rollout in rollouts:  # sorted by prompt, then sample
        samples[rollout.prompt_index].append(rollout.sample_index)
    incomplete = [i for i, indices in enumerate(samples) if indices != list(range(n))]
    if incomplete:
        raise ValueError(f"trainer.replay_rollouts={tr.cfg.trainer.replay_rollouts!r}: at step {step} prompt "
                         f"{incomplete[0]} has samples {samples[incomplete[0]]}, not 0..{n - 1} (rollout.n={n}); "
                         "the file is cut short or was made with another rollout.n")
    return prompts, rollouts


# ---------------------------------------------------------------------- SFT warm-up and exports


def sft_model_dir(run_dir: Path) -> Path:
    return run_dir / SFT_MODEL


def sft_warmup(tr: Trainer, out_dir: Path) -> None:
    """``trainer.sft_warmup_steps`` supervised steps on reference responses to training prompts, then
    the model is written to ``out_dir`` (HF) as the start of RL and its reference.

    The responses teach the answer FORMAT only: each one answers with the ground truth of another
    prompt of the same data source (a seeded shuffle), so whether an answer is right is left for RL
    to learn. Runs on every rank (collective)."""
    from dataclasses import replace

    from megatron_rl.data.builtin import sft_examples
    from megatron_rl.megatron.optim import build_optimizer
    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step

    cfg = tr.cfg
    rng = random.Random(cfg.trainer.seed)
    examples = list(tr.train_set.examples)
    truths: dict[str, list[str]] = defaultdict(list)
    for example in examples:
        truths[example.row.data_source].append(example.row.ground_truth)
    for values in truths.values():
        rng.shuffle(values)
    rows = [replace(e.row, ground_truth=truths[e.row.data_source].pop()) for e in examples]
    eos = tr.tokenizer.eos_token_id
    targets = tokenize([text for _, text in sft_examples(rows)], tr.tokenizer)
    optimizer = build_optimizer(tr.policy, replace(cfg.optim, lr=cfg.trainer.sft_lr))
    per_step = cfg.data.batch_size * cfg.rollout.n // tr.info.dp_size
    settings = LossSettings(kind="nll", kl_coef=0.0)
    order = list(range(len(examples)))
    rng.shuffle(order)
    for step in range(cfg.trainer.sft_warmup_steps):
        start = ((step * tr.info.dp_size + tr.info.dp_rank) * per_step) % len(order)  # each DP rank its own rows
        chosen = [order[(start + i) % len(order)] for i in range(per_step)]
        responses = [Rollout(j, 0, (*targets[i], eos), "", (0.0,) * (len(targets[i]) + 1), "stop")
                     for j, i in enumerate(chosen)]
        batch = pack_rollouts([examples[i].prompt_token_ids for i in chosen], responses, [0.0] * per_step, pad_id=eos)
        micro = make_micro_batches(batch, torch.arange(per_step), micro_batch_size=cfg.algorithm.micro_batch_size,
                                   loss_mask=batch.response_mask, old_logprobs=None, ref_logprobs=None,
                                   advantages=torch.zeros_like(batch.rollout_logprobs))
        result = train_step(tr.policy, optimizer, micro, global_num_tokens=count_valid_tokens(micro),
                            vocab_size=tr.hf_config.vocab_size, settings=settings)
        if tr.is_main:
            print(f"sft warm-up step {step + 1}/{cfg.trainer.sft_warmup_steps}: nll {result['loss']:.3f}", flush=True)
    export_hf(tr, out_dir)


def export_hf(tr: Trainer, out_dir: Path) -> None:
    """Write the policy as a Hugging Face model directory (collective; rank 0 writes, atomically)."""
    from megatron_rl.checkpoint.convert import write_hf_checkpoint

    tensors = (item for bucket in tr.sync.buckets() for item in bucket)  # streamed: one bucket at a time
    if tr.is_main:
        if out_dir.is_dir():  # an earlier export of this run (re-run after the end): the checkpoints hold the truth
            shutil.rmtree(out_dir)
        write_hf_checkpoint(out_dir, tensors, tr.hf_config, tokenizer_dir=tr.inputs.model_dir)
    else:
        for _ in tensors:  # the other ranks take part in the gathers
            pass
    barrier()  # the directory exists for every rank once this returns


def write_checkpoint_metadata(path: Path, cfg, model_dir: Path) -> None:
    """Next to a run checkpoint: the resolved config and the model's HF config and tokenizer, so the
    converter can turn it into a Hugging Face model with no other input."""
    from megatron_rl.checkpoint.hf_io import write_model_metadata

    (path / "config.yaml").write_text(to_yaml(cfg))
    write_model_metadata(path, model_dir)

