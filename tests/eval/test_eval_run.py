"""``megatron-rl eval`` end to end on the shipped Med-U1 files: the summary recomputed from
results.jsonl, resume after a fault and after SIGKILL, and a real tiny model on both backends."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from _scripted import ScriptedEngine, truths_for

from megatron_rl.cli import main
from megatron_rl.evaluation import EvalConfig, run_eval
from megatron_rl.evaluation.runner import SETTINGS_FILE

FILES = ("mediq", "medxpertqa", "medcalc", "huatuo")


def _config(tiny_dir, medu1_dir, out, **overrides) -> EvalConfig:
    fields = {"model": str(tiny_dir), "data": tuple(str(medu1_dir / f"{name}.parquet") for name in FILES),
              "output_dir": str(out), "n": 4, "budgets": (None, 256, 1024), "limit": 3, "max_tokens": 64,
              "batch_size": 4, "max_model_len": 8192}
    return EvalConfig(**{**fields, **overrides})


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def recompute(records: list[dict], n: int) -> dict[tuple[str, int | None], dict[str, float]]:
    """The summary figures straight from the per-sample records, written out independently."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["data_source"], r["budget"])].append(r)
    expected = {}
    for key, rs in groups.items():
        by_prompt = defaultdict(list)
        for r in rs:
            by_prompt[r["id"]].append(r["score"])
        figures = {"prompts": len(by_prompt), "samples": len(rs), "accuracy": sum(r["score"] for r in rs) / len(rs),
                   "mean_length": sum(r["response_num_tokens"] for r in rs) / len(rs)}
        if key[1] is not None:
            figures["mean_abs_budget_error"] = sum(abs(r["response_num_tokens"] - key[1]) for r in rs) / len(rs)
        if key[0] == "medical-o1-reasoning-SFT":
            figures["ems"] = sum(r["ems"] for r in rs) / len(rs)
            figures["rouge_l"] = sum(r["rouge_l"] for r in rs) / len(rs)
        figures[f"pass@{n}"] = sum(any(s) for s in by_prompt.values()) / len(by_prompt)  # pass@n: any correct
        figures["pass@1"] = figures["accuracy"]
        expected[key] = figures
    return expected


def _check_summary(out: Path, n: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    got = {(row["data_source"], row["budget"]): row for row in summary["benchmarks"]}
    expected = recompute(_lines(out), n)
    assert got.keys() == expected.keys()
    for key, figures in expected.items():
        for name, value in figures.items():
            assert math.isclose(got[key][name], value, rel_tol=1e-12, abs_tol=1e-12), (key, name)
    return got


def test_summary_equals_figures_recomputed_from_results(tiny_dir, medu1_dir, tmp_path) -> None:
    config = _config(tiny_dir, medu1_dir, tmp_path)
    summary = run_eval(config, ScriptedEngine(truths_for(config)), progress=False)
    records = _lines(tmp_path)
    assert len(records) == 4 * 3 * 3 * 4  # files x rows x budgets x samples
    assert summary["skipped_too_long"] == 0
    got = _check_summary(tmp_path, n=4)
    assert len(got) == 4 * 3
    # The script makes some samples right: accuracies are neither all 0 nor all 1.
    assert 0 < sum(r["score"] for r in records) < len(records)
    # A bare answer (no <answer> tag) is scored as the whole response.
    bare = [r for r in records if "<answer>" not in r["response"]]
    assert bare and all(r["answer"] == r["response"].strip() for r in bare)
    assert any(r["score"] == 1 for r in bare if r["data_source"] == "MedIQ")
    budgeted = next(r for r in records if r["budget"] == 256)
    assert budgeted["num_tokens"] == 256 and "Think for 256 tokens.<|im_end|>" in budgeted["prompt"]
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 1 + 12  # header + one row per group
    assert (tmp_path / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_a_fault_generates_only_what_is_missing(tiny_dir, medu1_dir, tmp_path) -> None:
    config = _config(tiny_dir, medu1_dir, tmp_path / "resumed", budgets=(512,), limit=2, batch_size=2)
    truths = truths_for(config)
    total = len(FILES) * 2
    with pytest.raises(RuntimeError, match="scripted fault after 2"):
        run_eval(config, ScriptedEngine(truths, fail_after_calls=2), progress=False)
    assert len(_lines(tmp_path / "resumed")) == 4 * config.n  # 2 calls x 2 prompts written
    engine = ScriptedEngine(truths)
    run_eval(config, engine, progress=False)
    assert len(engine.prompts_generated) == total - 4
    uninterrupted = _config(tiny_dir, medu1_dir, tmp_path / "whole", budgets=(512,), limit=2, batch_size=2)
    run_eval(uninterrupted, ScriptedEngine(truths), progress=False)
    def canonical(records):
        return sorted(json.dumps(r, sort_keys=True) for r in records)

    assert canonical(_lines(tmp_path / "resumed")) == canonical(_lines(tmp_path / "whole"))
    _check_summary(tmp_path / "resumed", n=config.n)


KILLED_RUN = """
import sys
from _scripted import ScriptedEngine, truths_for
from megatron_rl.evaluation import EvalConfig, run_eval
config = EvalConfig(model=sys.argv[1], data=tuple(sys.argv[3:]), output_dir=sys.argv[2], n=2, limit=2,
                    batch_size=1, max_tokens=64, max_model_len=8192)
run_eval(config, ScriptedEngine(truths_for(config), delay_s=0.5), progress=False)
"""


def test_resume_after_sigkill(tiny_dir, medu1_dir, tmp_path) -> None:
    data = [str(medu1_dir / f"{name}.parquet") for name in ("mediq", "huatuo")]
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tiny_dir), str(out), *data], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 600  # only a bound: the loop ends as soon as a prompt is written (slow under load)
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and len(results.read_text().splitlines()) >= 2:  # one whole prompt
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(results, "a") as f:
        f.write('{"id": "huatuo/0", "budg')  # what a write cut by the kill leaves
    written = {(r["id"], r["budget"]) for r in (json.loads(x) for x in results.read_text().splitlines()[:-1])}
    total = len(data) * 2
    assert 1 <= len(written) < total
    config = EvalConfig(model=str(tiny_dir), data=tuple(data), output_dir=str(out), n=2, limit=2, batch_size=1,
                        max_tokens=64, max_model_len=8192)
    engine = ScriptedEngine(truths_for(config))
    run_eval(config, engine, progress=False)
    complete = {key for key in written if sum((r["id"], r["budget"]) == key for r in _lines(out)) == 2}
    assert len(engine.prompts_generated) == total - len(complete)
    assert len(_lines(out)) == total * 2
    _check_summary(out, n=2)


def test_other_settings_in_the_same_folder_are_refused(tiny_dir, medu1_dir, tmp_path) -> None:
    config = _config(tiny_dir, medu1_dir, tmp_path, budgets=(), limit=1, n=1)
    run_eval(config, ScriptedEngine(truths_for(config)), progress=False)
    assert (tmp_path / SETTINGS_FILE).is_file()
    before = (tmp_path / "results.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds results of other settings \(n, temperature differ\)"):
        run_eval(_config(tiny_dir, medu1_dir, tmp_path, budgets=(), limit=1, n=2, temperature=0.7),
                 ScriptedEngine({}), progress=False)
    assert (tmp_path / "results.jsonl").read_text() == before  # n=2 did not drop the n=1 prompts


def test_cli_on_the_tiny_model_with_vllm(tiny_dir, medu1_dir, tmp_path, capsys) -> None:
    # The default backend; the transformers fallback (--backend hf) runs in bench/eval.py.
    out = tmp_path / "vllm"
    code = main(["eval", "--model", str(tiny_dir), "--data", str(medu1_dir / "mediq.parquet"),
                 str(medu1_dir / "huatuo.parquet"), "--output-dir", str(out), "--n", "2", "--budgets", "64,none",
                 "--max-tokens", "8", "--limit", "1"])
    assert code == 0
    assert "| MedIQ | 64 | 1 | 2 |" in capsys.readouterr().out
    records = _lines(out)
    assert len(records) == 2 * 2 * 2  # files x budgets x samples
    assert all(0 < r["response_num_tokens"] <= 8 for r in records)
    _check_summary(out, n=2)
    assert (out / "accuracy_vs_budget.png").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--budgets", "512,abc"], "--budgets item 'abc' must be a positive integer or 'none'"),
    (["--backend", "tgi"], "eval.backend='tgi' is not allowed"),
    (["--length-mode", "min"], "eval.length_mode='min' is not allowed"),
])
def test_cli_names_a_bad_option(args, message, tmp_path, capsys) -> None:
    code = main(["eval", "--model", str(tmp_path), "--data", "x.parquet", "--output-dir", str(tmp_path), *args])
    assert code == 2
    assert message in capsys.readouterr().err


class ProgressEngine(ScriptedEngine):
    """The scripted engine with the ``on_prompt_done`` hook of the real engines: it counts the
    results.jsonl lines present at each call (the bar moves during a batch, before any is written)."""

    def __init__(self, truths, results_path: Path) -> None:
        super().__init__(truths)
        self.results_path = results_path
        self.lines_at_call: list[int] = []

    def generate(self, prompt_token_ids, sampling, *, on_prompt_done=None):
        rollouts = super().generate(prompt_token_ids, sampling)
        for _ in prompt_token_ids:
            lines = self.results_path.read_text().count("\n") if self.results_path.exists() else 0
            self.lines_at_call.append(lines)
            on_prompt_done()
        return rollouts


def test_progress_advances_per_finished_prompt_and_own_budgets_fill_the_budget_column(
    tiny_dir, medu1_dir, tmp_path, capsys
) -> None:
    config = _config(tiny_dir, medu1_dir, tmp_path, budgets=(), limit=2, n=2, batch_size=4)  # 8 prompts, 2 calls
    engine = ProgressEngine(truths_for(config), tmp_path / "results.jsonl")
    summary = run_eval(config, engine, progress=True)
    assert engine.lines_at_call == [0, 0, 0, 0, 8, 8, 8, 8]  # after a call: its 4 prompts x 2 samples written
    assert "8/8" in capsys.readouterr().err
    records = _lines(tmp_path)
    assert all(r["format_valid"] == ("<answer>" in r["response"]) for r in records)  # the script's tagged answers
    assert all(r["loop_period"] is None and r["loop_tokens"] == 0 for r in records)  # tokens 0, 1, 2, ...
    for row in summary["benchmarks"]:  # Med-U1 prompts carry "Think for N tokens." with N of their own
        own = [r["num_tokens"] for r in records if r["data_source"] == row["data_source"]]
        assert row["budget"] is None and row["budget_label"] == f"own {min(own)}-{max(own)}"
        assert row["mean_abs_budget_error"] == pytest.approx(
            sum(abs(r["response_num_tokens"] - r["num_tokens"]) for r in records
                if r["data_source"] == row["data_source"]) / len(own))
    assert "own " in (tmp_path / "summary.md").read_text() and "| none |" not in (tmp_path / "summary.md").read_text()


def test_an_engine_without_the_progress_hook_advances_once_per_prompt_after_its_call(tiny_dir, medu1_dir) -> None:
    from megatron_rl.evaluation.runner import generate_with_progress
    from megatron_rl.rollout.base import SamplingConfig

    config = _config(tiny_dir, medu1_dir, "unused", budgets=(), limit=1, n=1)
    truths = truths_for(config)
    done = []
    rollouts = generate_with_progress(ScriptedEngine(truths), [list(ids) for ids in truths], SamplingConfig(n=1),
                                      on_prompt_done=lambda: done.append(1))
    assert len(done) == len(truths) == len(rollouts) == 4


def test_model_prompt_template_renders_medu1_rows_with_the_models_template(tiny_dir, medu1_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    from megatron_rl.evaluation.runner import build_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    stored = build_prompts(_config(tiny_dir, medu1_dir, tmp_path, budgets=(None, 256), limit=2), tokenizer)
    rendered = build_prompts(_config(tiny_dir, medu1_dir, tmp_path, budgets=(None, 256), limit=2,
                                     prompt_template="model"), tokenizer)
    assert [p.text for p in rendered] == [p.text for p in stored]  # Qwen's template: the stored text again
    assert all(not p.row.is_templated for p in rendered)
    assert "prompt_template" not in _config(tiny_dir, medu1_dir, tmp_path).settings()  # old folders resume


def test_vllm_engine_calls_on_prompt_done_once_per_prompt_and_samples_alike(tiny_dir) -> None:
    import torch

    from megatron_rl.rollout.base import SamplingConfig
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_dir, max_model_len=128, seed=0)
    try:
        prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
        sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=5)
        torch.set_num_threads(2)
        threads = []  # torch's thread count each time a prompt finished
        with_hook = engine.generate(prompts, sampling, on_prompt_done=lambda: threads.append(torch.get_num_threads()))
        assert threads == [2, 2, 2]  # one call per prompt; by default on the caller's threads
        engine.cpu_threads = 1  # rollout.cpu_threads=1 (CPU): generation on one thread, the caller's count after
        one_thread = engine.generate(prompts, sampling, on_prompt_done=lambda: threads.append(torch.get_num_threads()))
        assert threads[3:] == [1, 1, 1] and torch.get_num_threads() == 2
        assert [r.token_ids for r in with_hook] == [r.token_ids for r in one_thread]  # same samples either way
    finally:
        engine.close()
