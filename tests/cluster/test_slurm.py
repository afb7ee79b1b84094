"""The sbatch scripts: shellcheck-clean, and a dry run on three simulated nodes.

The dry run fakes the SLURM environment: ``SLURM_*`` variables, and stand-ins for ``scontrol``
(expands the node list), ``srun`` (records which command would start on which node; a ``ray start
--block`` step stays alive until it is sent SIGTERM, like the real one) and the Python interpreter
(records the command). Nothing of Ray or the trainer runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = ("train.sbatch", "convert.sbatch", "eval.sbatch")

FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames NODELIST  ->  one node per line (the test's list is node[0-2])
[[ $1 == show && $2 == hostnames ]] || exit 1
printf 'node%s\\n' 0 1 2
"""

FAKE_SRUN = """#!/bin/bash
# Record "NODE<TAB>COMMAND"; answer `hostname --ip-address`; keep `--block` steps alive until SIGTERM.
node=?
trap 'printf "%s\\tstopped\\n" "$node" >> "$FAKE_LOG"; exit 0' TERM
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    -w) node=$2; shift 2 ;;
    --nodelist=*) node=${1#*=}; shift ;;
    *) shift ;;
  esac
done
printf '%s\\t%s\\n' "$node" "$*" >> "$FAKE_LOG"
if [[ $1 == hostname ]]; then echo "10.0.0.${node#node}"; exit 0; fi
if [[ " $* " == *" --block "* ]]; then
  while true; do sleep 0.05; done
fi
"""

FAKE_PYTHON = """#!/bin/bash
printf 'batch\\t%s %s\\n' "$(basename "$0")" "$*" >> "$FAKE_LOG"
# the launch runs a while (the Ray steps are up by then), then exits with FAKE_LAUNCH_EXIT
if [[ " $* " == *" megatron_rl.cluster.launch "* ]]; then sleep 0.5; exit "${FAKE_LAUNCH_EXIT:-0}"; fi
"""


def _stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("fake-python", FAKE_PYTHON),
                       ("fake-megatron-rl", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "commands.log"
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-2]", "SLURM_NNODES": "3",
            "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "PYTHON": str(bin_dir / "fake-python"),
            "MEGATRON_RL": str(bin_dir / "fake-megatron-rl")}


def _run(script: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    result = subprocess.run(["bash", str(SLURM / script), *args], env=env, capture_output=True, text=True,
                            timeout=60, cwd=REPO, check=False)
    log = Path(env["FAKE_LOG"])
    return result, (log.read_text().splitlines() if log.exists() else [])


def test_shellcheck_passes() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "--severity=style", *(str(SLURM / s) for s in SCRIPTS)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_broad_process_kills() -> None:
    for script in SCRIPTS:
        text = (SLURM / script).read_text()
        for banned in ("pkill", "killall", "ray stop", "kill -9 -1", "kill 0"):
            assert banned not in text, f"{script} uses {banned!r}"


def test_train_dry_run_starts_head_workers_launch_and_tears_down(tmp_path: Path) -> None:
    result, log = _run("train.sbatch", ["examples/medu1_qwen2.5_7b.yaml", "trainer.total_steps=3"], _stubs(tmp_path))
    assert result.returncode == 0, result.stderr
    started = [line.split("\t") for line in log]
    assert started[0] == ["node0", "hostname --ip-address"]
    ray_steps = {node: cmd for node, cmd in started if " start " in f" {cmd} "}
    assert set(ray_steps) == {"node0", "node1", "node2"}
    assert "--head --node-ip-address=10.0.0.0 --port=6379" in ray_steps["node0"]
    for worker in ("node1", "node2"):
        assert "--address=10.0.0.0:6379" in ray_steps[worker] and "--head" not in ray_steps[worker]
    for cmd in ray_steps.values():
        assert "--num-gpus=4 --num-cpus=32" in cmd and cmd.endswith("--block")
    batch = [cmd for node, cmd in started if node == "batch"]
    assert batch == [
        "fake-python -m megatron_rl.cluster.nodes --address 10.0.0.0:6379 --nodes 1 --gpus 4 --timeout 600",
        "fake-python -m megatron_rl.cluster.nodes --address 10.0.0.0:6379 --nodes 3 --gpus 12 --timeout 600",
        ("fake-python -m megatron_rl.cluster.launch examples/medu1_qwen2.5_7b.yaml cluster.address=10.0.0.0:6379 "
         "cluster.num_trainers=12 trainer.total_steps=3"),
    ]
    # the head starts (and is waited for) before the workers; the launch comes after every worker
    order = [node if node != "batch" else cmd.split()[2] for node, cmd in started if cmd != "stopped"]
    assert order.index("node0") < order.index("megatron_rl.cluster.nodes") < order.index("node1")
    assert order.index("node2") < order.index("megatron_rl.cluster.launch")
    stopped = sorted(node for node, cmd in started if cmd == "stopped")
    assert stopped == ["node0", "node1", "node2"]


def test_train_dry_run_tears_down_when_the_launch_fails(tmp_path: Path) -> None:
    env = _stubs(tmp_path) | {"FAKE_LAUNCH_EXIT": "3", "NUM_ENGINE_GPUS": "2"}
    result, log = _run("train.sbatch", ["examples/medu1_qwen2.5_3b.yaml"], env)
    assert result.returncode == 3
    assert any("cluster.num_trainers=10" in line for line in log)
    assert sorted(line.split("\t")[0] for line in log if line.endswith("\tstopped")) == ["node0", "node1", "node2"]


def test_train_needs_a_config(tmp_path: Path) -> None:
    result, log = _run("train.sbatch", [], _stubs(tmp_path))
    assert result.returncode == 2 and "usage: sbatch" in result.stderr
    assert log == []


@pytest.mark.parametrize(("script", "args", "expected"), [
    ("convert.sbatch", ["hf-to-megatron", "/m/Qwen2.5-7B", "/ckpt/q7", "--tp", "2"],
     "batch\tfake-megatron-rl convert hf-to-megatron /m/Qwen2.5-7B /ckpt/q7 --tp 2"),
    ("eval.sbatch", ["--model", "runs/x/hf", "--data", "a.parquet", "--output-dir", "runs/x/eval"],
     "batch\tfake-megatron-rl eval --model runs/x/hf --data a.parquet --output-dir runs/x/eval"),
])
def test_convert_and_eval_pass_their_arguments(tmp_path: Path, script: str, args: list[str], expected: str) -> None:
    result, log = _run(script, args, _stubs(tmp_path))
    assert result.returncode == 0, result.stderr
    assert log == [expected]
