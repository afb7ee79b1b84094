"""The quiet console (megatron_rl/console.py): the listed harmless warnings are filtered, nothing else
is, and --verbose / MEGATRON_RL_VERBOSE=1 shows everything."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from megatron_rl import cli, console


@pytest.fixture
def clean_loggers():
    """Remove the console's logging filters after a test (they live on process-wide loggers)."""
    yield
    for item in console.HARMLESS:
        if item.channel == "logging":
            logger = logging.getLogger(item.source)
            for f in [f for f in logger.filters if isinstance(f, console._MessageFilter)]:
                logger.removeFilter(f)


def test_every_entry_names_its_message_source_and_reason():
    assert len({item.message for item in console.HARMLESS}) == len(console.HARMLESS)
    for item in console.HARMLESS:
        assert item.channel in ("warnings", "logging", "c++")
        assert item.source and len(item.why) > 30, item


def test_listed_python_warnings_are_filtered_and_others_are_not(monkeypatch, clean_loggers):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert console.install(verbose=False) is False
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                      UserWarning, stacklevel=1)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=1)
        warnings.warn("`torch.distributed.reduce_op` is deprecated, please use ...", FutureWarning, stacklevel=1)
        warnings.warn("Transformer Engine is broken in a new way", UserWarning, stacklevel=1)  # not listed
        warnings.warn("`torch.distributed.reduce_op` is deprecated", UserWarning, stacklevel=1)  # other category
    assert [str(w.message) for w in caught] == ["Transformer Engine is broken in a new way",
                                                "`torch.distributed.reduce_op` is deprecated"]
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"


def test_listed_vllm_log_lines_are_dropped_at_their_logger_and_others_kept(clean_loggers):
    console.install(verbose=False)
    console.install(verbose=False)  # idempotent: one filter per logger
    assert sum(isinstance(f, console._MessageFilter) for f in logging.getLogger("vllm.platforms.cpu").filters) == 1
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("vllm.platforms.cpu", "vllm.config.vllm")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:  # at the originating loggers: whatever vLLM configured above them
            logger.addHandler(handler)
            logger.setLevel(logging.WARNING)
        loggers[0].warning("Triton is not installed. triton-cpu is expected on x86 CPUs.")
        loggers[1].warning("Model Runner V2 requires Triton; using the V1 model runner instead.")
        loggers[0].warning("Out of memory on node %d", 0)  # not listed: kept
        loggers[0].error("Triton is not installed. But this is an error")  # kept
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert seen == ["Out of memory on node 0", "Triton is not installed. But this is an error"]


def test_verbose_filters_nothing_and_lets_vllm_log_info(monkeypatch, clean_loggers):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert console.install(verbose=True) is True
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=1)
    assert len(caught) == 1 and os.environ["VLLM_LOGGING_LEVEL"] == "INFO"
    assert not logging.getLogger("vllm.config.vllm").filters
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.install() is True and console.verbose_from_env()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not console.verbose_from_env()


def test_the_cli_takes_verbose_anywhere_and_installs_the_console_first(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(console, "install", lambda verbose=None: calls.append(verbose))
    args = ["make-tasks", "--output-dir", str(tmp_path / "t"), "--num-train", "4", "--num-test", "2"]
    assert cli.main(args) == 0
    assert cli.main([*args[:3], "--verbose", *args[3:]]) == 0  # after the command
    assert cli.main(["--verbose", *args]) == 0
    assert calls == [None, True, True]  # None: MEGATRON_RL_VERBOSE decides


QUIET_IMPORTS = """
import os, sys
sys.argv = ["megatron-rl"]
from megatron_rl import console
console.install()
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
import megatron.core.optimizer  # warns about Transformer Engine / Apex at import
import vllm.triton_utils  # logs about Triton's CPU backend at import (CPU build)
print("imported")
"""


def test_a_fresh_process_imports_megatron_and_vllm_quietly():
    """Once, end to end (the imports take ~10 s idle); the verbose path installs nothing (above)."""
    hidden = (console.VERBOSE_ENV, "VLLM_LOGGING_LEVEL", "PYTHONWARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    done = subprocess.run([sys.executable, "-c", QUIET_IMPORTS], env=env, capture_output=True, text=True, timeout=600,
                          check=True)
    assert "imported" in done.stdout
    said = done.stderr + done.stdout
    assert "Transformer Engine and Apex are not installed" not in said and "Apex is not" not in said, said[-2000:]
    if console._has_vllm_cpu_build():
        assert "Triton is installed, but doesn't include CPU backend" not in said

