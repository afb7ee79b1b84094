"""The sbatch scripts: shellcheck-clean, and a dry run on three simulated nodes.

The dry run fakes the SLURM environment: ``SLURM_*`` variables, and stand-ins for ``scontrol``
(expands the node list), ``getent`` (resolves nodeN to 10.0.0.N, or to Debian's 127.0.1.1 with
FAKE_LOOPBACK=1), ``srun`` (records the node, its own options, the command and the network variables it
passes on, then runs the command locally; a ``ray start --block`` step stays alive until it is sent
SIGTERM, like the real one, or exits at once with FAKE_RAY_FAILS=NODE) and the Python interpreter
(records the command; the node wait takes FAKE_WAIT_S seconds). Nothing of Ray or the trainer runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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

FAKE_GETENT = """#!/bin/bash
# getent ahostsv4 nodeN -> 10.0.0.N (or the loopback entry of a Debian-style /etc/hosts)
[[ $1 == ahostsv4 ]] || exit 2
if [[ -n ${FAKE_LOOPBACK:-} ]]; then ip=127.0.1.1; else ip=10.0.0.${2#node}; fi
printf '%s       STREAM %s\\n%s       DGRAM  \\n%s       RAW    \\n' "$ip" "$2" "$ip" "$ip"
"""

FAKE_SRUN = """#!/bin/bash
# Record "NODE<TAB>OPTIONS<TAB>COMMAND<TAB>ENV", then run the command on this machine. `hostname -I` and
# `ip -o -4 addr show` answer as node N would (address 10.0.0.N on ib0); `ray start ... --block` stays
# alive until SIGTERM (or fails at once on FAKE_RAY_FAILS).
node=? options=()
child=
trap 'printf "%s\\tstopped\\n" "$node" >> "$FAKE_LOG"; if [[ -n $child ]]; then kill "$child"; fi; exit 0' TERM
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    -w) node=$2; shift 2 ;;
    *) options+=("$1"); shift ;;
  esac
done
printf '%s\\t%s\\t%s\\tGLOO_SOCKET_IFNAME=%s NCCL_SOCKET_IFNAME=%s SRUN_CPUS_PER_TASK=%s\\n' "$node" "${options[*]}" \\
  "$*" "${GLOO_SOCKET_IFNAME:-}" "${NCCL_SOCKET_IFNAME:-}" "${SRUN_CPUS_PER_TASK:-}" >> "$FAKE_LOG"
if [[ $1 == hostname && $2 == -I ]]; then echo "10.0.0.${node#node} fe80::1"; exit 0; fi
if [[ $1 == ip ]]; then
  printf '1: lo    inet 127.0.0.1/8 scope host lo\\n2: ib0    inet 10.0.0.%s/16 brd 10.0.255.255 scope global ib0\\n' \\
    "${node#node}"
  exit 0
fi
if [[ " $* " == *" --block "* ]]; then
  if [[ $node == "${FAKE_RAY_FAILS:-}" ]]; then echo "ray start failed on $node" >&2; exit 1; fi
  while true; do sleep 0.05; done
fi
"$@" &
child=$!
wait "$child"
"""

FAKE_PYTHON = """#!/bin/bash
printf 'python\\t%s %s\\n' "$(basename "$0")" "$*" >> "$FAKE_LOG"
if [[ " $* " == *" megatron_rl.cluster.nodes "* ]]; then
  # like the real wait, return only once the head's `ray start` is up (here: has been logged)
  for _ in $(seq 100); do if grep -q -- "--head" "$FAKE_LOG"; then break; fi; sleep 0.1; done
  for _ in $(seq "$(( ${FAKE_WAIT_S:-0} * 10 ))"); do sleep 0.1; done
fi
# the launch runs a while (the Ray steps are up by then), then exits with FAKE_LAUNCH_EXIT
if [[ " $* " == *" megatron_rl.cluster.launch "* ]]; then sleep 0.5; exit "${FAKE_LAUNCH_EXIT:-0}"; fi
"""


def _stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("getent", FAKE_GETENT), ("srun", FAKE_SRUN),
                       ("fake-python", FAKE_PYTHON), ("fake-ray", FAKE_PYTHON), ("fake-megatron-rl", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "commands.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "GLOO_", "NCCL_", "HEAD_IP"))}
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-2]", "SLURM_NNODES": "3",
            "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32", "PYTHON": str(bin_dir / "fake-python"),
            "RAY": str(bin_dir / "fake-ray"), "MEGATRON_RL": str(bin_dir / "fake-megatron-rl"), "WATCH_INTERVAL": "0.1"}


def _run(script: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    result = subprocess.run(["bash", str(SLURM / script), *args], env=env, capture_output=True, text=True,
                            timeout=120, cwd=REPO, check=False)
    log = Path(env["FAKE_LOG"])
    return result, (log.read_text().splitlines() if log.exists() else [])


def _steps(log: list[str]) -> list[dict[str, str]]:
    """The srun lines of the log as {node, options, command, env}."""
    return [dict(zip(("node", "options", "command", "env"), line.split("\t"), strict=True))
            for line in log if line.count("\t") == 3]


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
    steps = _steps(log)
    # every srun step asks for the node's CPUs (srun does not inherit --cpus-per-task since Slurm 22.05),
    # takes the environment along, and passes on the network interfaces
    for step in steps:
        assert "--cpus-per-task=32" in step["options"].split() and "--export=ALL" in step["options"].split(), step
        assert step["env"] == "GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=^lo,docker0 SRUN_CPUS_PER_TASK=32" or \
            step["command"].startswith("ip "), step
    assert steps[0]["node"] == "node0" and steps[0]["command"] == "ip -o -4 addr show"  # GLOO_SOCKET_IFNAME default
    ray_steps = {s["node"]: s for s in steps if s["command"].split()[1:2] == ["start"]}
    assert set(ray_steps) == {"node0", "node1", "node2"}
    # the head's IPv4 address from getent (10.0.0.0), not `hostname --ip-address`
    assert "--head --node-ip-address=10.0.0.0 --port=6379" in ray_steps["node0"]["command"]
    for worker in ("node1", "node2"):
        command = ray_steps[worker]["command"]
        assert "--address=10.0.0.0:6379" in command and "--head" not in command
    for step in ray_steps.values():
        assert "--num-gpus=4 --num-cpus=32" in step["command"] and step["command"].endswith("--block")
        assert "--overlap" not in step["options"]
    # the waits and the launch run as steps on the head node, beside the Ray head (--overlap)
    head_steps = [s for s in steps if s["command"].split()[1:2] != ["start"] and not s["command"].startswith("ip ")]
    fake = str(tmp_path / "bin" / "fake-python")
    assert [s["command"] for s in head_steps] == [
        f"timeout 600 {fake} -m megatron_rl.cluster.nodes --address 10.0.0.0:6379 --nodes 1 --gpus 4 --timeout 600",
        f"timeout 600 {fake} -m megatron_rl.cluster.nodes --address 10.0.0.0:6379 --nodes 3 --gpus 12 --timeout 600",
        (f"{fake} -m megatron_rl.cluster.launch examples/medu1_qwen2.5_7b.yaml cluster.address=10.0.0.0:6379 "
         "cluster.num_trainers=12 trainer.total_steps=3"),
    ]
    assert all(s["node"] == "node0" and "--overlap" in s["options"].split() for s in head_steps)
    # the head is waited for before the workers start; the launch comes after every worker (the head's own
    # line may come after the wait's: both steps run at once, and each fake srun writes when it gets to it;
    # the fake wait returns only once the head's line is there)
    order = [s["node"] if s in ray_steps.values() else s["command"].split()[-1] for s in steps
             if not s["command"].startswith("ip ")]
    first_wait = order.index("600")
    assert first_wait < order.index("node1") < order.index("trainer.total_steps=3")
    assert order.index("node0") < order.index("node1") and order.index("node2") < order.index("trainer.total_steps=3")
    stopped = sorted(line.split("\t")[0] for line in log if line.endswith("\tstopped"))
    assert stopped == ["node0", "node1", "node2"]


def test_train_dry_run_tears_down_when_the_launch_fails(tmp_path: Path) -> None:
    env = _stubs(tmp_path) | {"FAKE_LAUNCH_EXIT": "3", "NUM_ENGINE_GPUS": "2"}
    result, log = _run("train.sbatch", ["examples/medu1_qwen2.5_3b.yaml"], env)
    assert result.returncode == 3
    assert any("cluster.num_trainers=10" in line for line in log)
    assert sorted(line.split("\t")[0] for line in log if line.endswith("\tstopped")) == ["node0", "node1", "node2"]


def test_a_ray_head_that_dies_at_once_ends_the_job_at_once(tmp_path: Path) -> None:
    """The node wait would take 60 s; the dead head step is noticed within the watch interval."""
    env = _stubs(tmp_path) | {"FAKE_RAY_FAILS": "node0", "FAKE_WAIT_S": "60"}
    start = time.monotonic()
    result, log = _run("train.sbatch", ["examples/medu1_qwen2.5_3b.yaml"], env)
    assert result.returncode == 1
    assert time.monotonic() - start < 30
    assert "error: the Ray step on node0 (srun pid " in result.stderr and "exited with status 1" in result.stderr
    assert not any("megatron_rl.cluster.launch" in line for line in log)
    assert not any(s["command"].split()[1:2] == ["start"] and s["node"] != "node0" for s in _steps(log))  # no workers


@pytest.mark.parametrize(("extra_env", "expected_ip", "expected_steps"), [
    ({"FAKE_LOOPBACK": "1"}, "10.0.0.0", ["hostname -I", "ip -o -4 addr show"]),  # getent gave 127.0.1.1 only
    ({"HEAD_IP": "192.168.7.7"}, "192.168.7.7", ["ip -o -4 addr show"]),  # set by hand (no interface holds it)
])
def test_the_head_address_is_ipv4_and_never_loopback(tmp_path: Path, extra_env, expected_ip, expected_steps) -> None:
    env = _stubs(tmp_path) | extra_env
    result, log = _run("train.sbatch", ["examples/medu1_qwen2.5_3b.yaml"], env)
    assert result.returncode == 0, result.stderr
    probes = [s["command"] for s in _steps(log) if s["command"].split()[0] in ("hostname", "ip")]
    assert probes == expected_steps
    assert any(f"--head --node-ip-address={expected_ip} --port=6379" in line for line in log)
    assert any(f"cluster.address={expected_ip}:6379" in line for line in log)
    if "HEAD_IP" in extra_env:
        assert "GLOO_SOCKET_IFNAME is left unset" in result.stdout


def test_network_interfaces_can_be_set(tmp_path: Path) -> None:
    env = _stubs(tmp_path) | {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib0,ib1"}
    result, log = _run("train.sbatch", ["examples/medu1_qwen2.5_3b.yaml"], env)
    assert result.returncode == 0, result.stderr
    steps = _steps(log)
    assert not any(s["command"].startswith("ip ") for s in steps)  # no detection when set
    assert {s["env"] for s in steps} == {"GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=ib0,ib1 SRUN_CPUS_PER_TASK=32"}


def test_train_stops_early_without_the_environment(tmp_path: Path) -> None:
    env = _stubs(tmp_path) | {"PYTHON": str(tmp_path / "missing-python")}
    result, log = _run("train.sbatch", ["examples/medu1_qwen2.5_3b.yaml"], env)
    assert result.returncode == 2 and "missing-python' not found" in result.stderr
    assert log == []


def test_train_needs_a_config(tmp_path: Path) -> None:
    result, log = _run("train.sbatch", [], _stubs(tmp_path))
    assert result.returncode == 2 and "usage: sbatch" in result.stderr
    assert log == []


@pytest.mark.parametrize(("script", "args", "expected"), [
    ("convert.sbatch", ["hf-to-megatron", "/m/Qwen2.5-7B", "/ckpt/q7", "--tp", "2"],
     "python\tfake-megatron-rl convert hf-to-megatron /m/Qwen2.5-7B /ckpt/q7 --tp 2"),
    ("eval.sbatch", ["--model", "runs/x/hf", "--data", "a.parquet", "--output-dir", "runs/x/eval"],
     "python\tfake-megatron-rl eval --model runs/x/hf --data a.parquet --output-dir runs/x/eval"),
])
def test_convert_and_eval_pass_their_arguments(tmp_path: Path, script: str, args: list[str], expected: str) -> None:
    result, log = _run(script, args, _stubs(tmp_path))
    assert result.returncode == 0, result.stderr
    assert log == [expected]
