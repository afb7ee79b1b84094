"""`megatron-rl score`: files in, per-source accuracy out; bad input gives one clear line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rl.cli import main
from megatron_rl.data.schema import read_rows


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sample_scores_every_task_type(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--sample"]) == 0
    out = capsys.readouterr().out
    for source in ("MedIQ", "MedXpertQA", "MedCalc-Bench", "medical-o1-reasoning-SFT", "all"):
        assert source in out
    assert main(["score", "--sample", "reward.choice_parsing=lenient"]) == 0
    lenient = capsys.readouterr().out
    medxpert = [line for line in out.splitlines() if line.startswith("MedXpertQA") and "multiple_choice" in line]
    medxpert_lenient = [line for line in lenient.splitlines() if line.startswith("MedXpertQA") and "multiple_choice" in line]
    assert medxpert[0].split()[3] == "0.500" and medxpert_lenient[0].split()[3] == "1.000"


def test_score_a_medu1_file(medu1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parquet = medu1_dir / "mediq.parquet"
    specs, _ = read_rows(parquet)
    # Two responses per row: the right letter, then a wrong one -> accuracy exactly 0.5.
    records = []
    for row, spec in enumerate(specs):
        for letter in (spec.ground_truth, "Z"):
            records.append({"row": row, "response": f"<think>t</think><answer>{letter}</answer>",
                            "response_num_tokens": spec.num_tokens})
    responses = write_jsonl(tmp_path / "responses.jsonl", records)
    output = tmp_path / "scores.jsonl"
    assert main(["score", str(parquet), "--responses", str(responses), "--output", str(output)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("MedIQ"))
    assert line.split()[2:4] == [str(2 * len(specs)), "0.500"]
    scored = [json.loads(l) for l in output.read_text().splitlines()]
    assert len(scored) == 2 * len(specs)
    assert [s["valid"] for s in scored[:2]] == [1, 0] and scored[0]["total"] == 3.0


def tiny_parquet(path: Path, num_tokens: int = -1) -> Path:
    rows = [{"data_source": "MedIQ", "prompt": [{"role": "user", "content": "q"}], "ability": "medical",
             "reward_model": {"style": "rule", "ground_truth": "A", "num_tokens": num_tokens,
                              "lower_limit": None, "upper_limit": None},
             "extra_info": {"split": "test", "index": 0}}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"response": "x"}', "{not json"], "line 2 is not valid JSON"),
        (['{"answer": "x"}'], "line 1: missing field 'response'"),
        (['{"row": 5, "response": "x"}'], r"line 1: row=5 must be an integer in \[0, 1\)"),
        (['{"response": "x"}', '{"response": "y"}'], "line 2: more responses than the 1 rows"),
        (['[1, 2]'], "line 1 must be a JSON object"),
        ([""], "has 0 responses for 1 rows"),
    ],
)
def test_bad_response_files_fail_with_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], lines, message) -> None:
    parquet = tiny_parquet(tmp_path / "p.parquet")
    responses = tmp_path / "r.jsonl"
    responses.write_text("\n".join(lines) + "\n")
    assert main(["score", str(parquet), "--responses", str(responses)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_length_controlled_rows_need_token_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parquet = tiny_parquet(tmp_path / "p.parquet", num_tokens=200)
    responses = write_jsonl(tmp_path / "r.jsonl", [{"response": "<think>t</think><answer>A</answer>"}])
    assert main(["score", str(parquet), "--responses", str(responses)]) == 2
    assert "pass --tokenizer DIR" in capsys.readouterr().err
    assert main(["score", str(parquet), "--responses", str(responses), "--no-length"]) == 0
    assert "MedIQ" in capsys.readouterr().out


def test_bad_parquet_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    responses = write_jsonl(tmp_path / "r.jsonl", [{"response": "x"}])
    assert main(["score", str(tmp_path / "bad.parquet"), "--responses", str(responses)]) == 2
    assert "not a readable parquet file" in capsys.readouterr().err
    assert main(["score", "--sample", "reward.threshhold=3"]) == 2
    assert "unknown config key 'reward.threshhold'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["score", "--sample", "--bogus"])
    assert exited.value.code == 2 and "--bogus" in capsys.readouterr().err


def test_tokenizer_counts_response_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer

    from megatron_rl.testing import tiny_model

    model_dir = tiny_model(tmp_path / "tiny")
    parquet = tiny_parquet(tmp_path / "p.parquet", num_tokens=5)
    response = "<think>fever and neck stiffness</think><answer>A</answer>"
    responses = write_jsonl(tmp_path / "r.jsonl", [{"response": response}])
    output = tmp_path / "scores.jsonl"
    assert main(["score", str(parquet), "--responses", str(responses), "--tokenizer", str(model_dir),
                 "--output", str(output)]) == 0
    used = len(AutoTokenizer.from_pretrained(model_dir)(response, add_special_tokens=False)["input_ids"])
    assert used > 5
    length = json.loads(output.read_text())["length"]
    assert length == pytest.approx(1 - abs(used - 5) / 1500)


def test_oracle_scores_each_rows_ground_truth(medu1_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", str(medu1_dir / "medcalc.parquet"), "--oracle"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("MedCalc-Bench"))
    assert line.split()[3:5] == ["1.000", "3.000"]  # every ground truth correct, well formed, on budget
    # Overrides may follow the options.
    assert main(["score", str(medu1_dir / "huatuo.parquet"), "--oracle", "reward.bleu_percent=true"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("medical-o1"))
    assert line.split()[3] == "1.000"


def test_tools_script_is_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "tools/score.py", "--sample"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=False)
    assert done.returncode == 0, done.stderr
    assert "MedCalc-Bench" in done.stdout
