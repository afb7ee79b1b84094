"""megatron_rl.algorithms stays pure tensor math (STYLE.md principle 1), read from the code's AST
(docstrings may mention what the code must not do)."""

from __future__ import annotations

import ast
from pathlib import Path

from megatron_rl import algorithms

SOURCES = sorted(Path(algorithms.__file__).parent.glob("*.py"))


def offences(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        for module in modules:
            if module == "megatron" or module.startswith(("megatron.", "torch.distributed", "megatron_rl.config")):
                found.append(f"import {module}")
        if isinstance(node, ast.Attribute) and node.attr in ("item", "distributed"):
            found.append(f".{node.attr}")
    return found


def test_sources_found() -> None:
    assert {p.name for p in SOURCES} >= {"advantages.py", "policy_loss.py", "kl.py", "aggregation.py", "entropy.py"}


def test_offence_finder_finds_offences() -> None:
    bad = "import megatron.core\nfrom torch.distributed import all_reduce\nx.item()\ntorch.distributed.get_rank()"
    assert offences(ast.parse(bad)) == ["import megatron.core", "import torch.distributed", ".item", ".distributed"]


def test_no_megatron_item_or_process_groups() -> None:
    found = {path.name: offences(ast.parse(path.read_text())) for path in SOURCES}
    assert {name: hits for name, hits in found.items() if hits} == {}
