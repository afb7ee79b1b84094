"""Security: no code runs from model or data files, and no name from data or config writes outside its folder.

- The source of megatron_rl/, tools/ and bench/ (parsed, not grepped) calls no eval/exec/compile, no
  pickle-like loader, no unsafe YAML loader, no torch.load without weights_only=True and no loader with
  allow_pickle=True; trust_remote_code is never switched on.
- A model directory whose config.json asks for remote code (``auto_map``) is loaded through every loading
  path of the project without running that code.
- Hostile names (``../``, absolute paths) in data and options are refused or kept inside the output folder.
"""

from __future__ import annotations

import ast
import io
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_rl import cli
from megatron_rl.data.builtin import make_tasks
from megatron_rl.data.prepare import PrepareOptions, prepare
from megatron_rl.data.schema import RowError, row_from_record
from megatron_rl.paths import check_file_name, safe_child

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("megatron_rl", "tools", "bench")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "shelve", "cloudpickle", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for ``torch.load``, 'load' for ``load``; '' for anything else (calls, subscripts)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[str]:
    """The unsafe loads and code execution in one module's source: ``"<line>: <what>"`` each.

    Flags: eval/exec/compile/__import__ called as builtins (``model.eval()`` is a method call, not
    flagged); any import of a pickle-like module; ``torch.load`` (however imported) without the literal
    keyword ``weights_only=True``; ``yaml.load`` without a safe Loader, ``yaml.unsafe_load``/``full_load``;
    ``pandas.read_pickle``; any call passing ``allow_pickle=True``; trust_remote_code set to anything but
    the literal False, also through a dict key.
    """
    tree = ast.parse(source)
    found = []
    torch_load_names = {"torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{node.lineno}: from {node.module} import ...")
            if node.module == "torch":
                torch_load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                    found.append(f"{node.lineno}: 'trust_remote_code' as a dict key")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        line = node.lineno
        bare = isinstance(node.func, ast.Name) and name in UNSAFE_BUILTINS  # eval(...), not model.eval()
        if bare or name.startswith("builtins.") and name.removeprefix("builtins.") in UNSAFE_BUILTINS:
            found.append(f"{line}: {name}()")
        if name in torch_load_names and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{line}: {name}() without weights_only=True")
        if name.endswith("yaml.load") or name == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{line}: {name}() without a safe Loader")
        if name.split(".")[-1] in ("unsafe_load", "full_load", "unsafe_load_all", "read_pickle"):
            found.append(f"{line}: {name}()")
        if _is_true(_keyword(node, "allow_pickle")):
            found.append(f"{line}: {name}(allow_pickle=True)")
        remote = _keyword(node, "trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"{line}: {name}(trust_remote_code={ast.unparse(remote)})")
    return found


def _project_files() -> list[Path]:
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))
    assert len(files) > 50, files  # the scan saw the project, not an empty folder
    return files


def test_the_scanner_flags_each_unsafe_form() -> None:
    bad = {
        "eval(text)": "eval()", "exec(code)": "exec()", "compile(s, 'f', 'exec')": "compile()",
        "import pickle": "import pickle", "from dill import loads": "from dill", "import marshal": "import marshal",
        "import torch\ntorch.load(p)": "without weights_only=True",
        "torch.load(p, weights_only=False)": "without weights_only=True",
        "torch.load(p, weights_only=flag)": "without weights_only=True",
        "from torch import load as tl\ntl(p)": "tl() without weights_only=True",
        "yaml.load(s)": "without a safe Loader", "yaml.load(s, Loader=yaml.FullLoader)": "without a safe Loader",
        "yaml.unsafe_load(s)": "unsafe_load()", "np.load(p, allow_pickle=True)": "allow_pickle=True",
        "pd.read_pickle(p)": "read_pickle()", "builtins.eval(s)": "builtins.eval()",
        "AutoConfig.from_pretrained(d, trust_remote_code=True)": "trust_remote_code=True",
        "LLM(model=d, trust_remote_code=cfg.remote)": "trust_remote_code=cfg.remote",
        "LLM(**{'trust_remote_code': True})": "dict key",
    }
    for source, what in bad.items():
        flagged = unsafe_calls(source)
        assert len(flagged) == 1 and what in flagged[0], (source, flagged)
    good = ["model.eval()", "torch.load(p, map_location='cpu', weights_only=True)", "yaml.safe_load(s)",
            "yaml.load(s, Loader=yaml.SafeLoader)", "np.load(p)", "np.load(p, allow_pickle=False)",
            "json.loads(s)", "builtins.print(s)", "AutoConfig.from_pretrained(d)", "AutoConfig.from_pretrained(d, trust_remote_code=False)",
            "re.compile(pattern)", "ast.literal_eval(s)"]
    for source in good:
        assert unsafe_calls(source) == [], source


def test_no_code_execution_or_unsafe_load_in_the_project() -> None:
    found = {str(path.relative_to(REPO)): unsafe_calls(path.read_text(encoding="utf-8")) for path in _project_files()}
    assert {path: lines for path, lines in found.items() if lines} == {}


def test_every_torch_load_in_the_project_passes_weights_only() -> None:
    """The project does load torch files (so the scan above has something to hold to)."""
    calls = [node for path in _project_files() for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load"]
    assert calls, "no torch.load found: the scan would not notice one without weights_only"
    assert all(_is_true(_keyword(call, "weights_only")) for call in calls)


# --- Remote code in a model directory ----------------------------------------------------------


def _remote_code_model(tmp_path: Path, *, known_type: bool) -> tuple[Path, Path]:
    """The tiny model with ``auto_map`` entries (config, model, tokenizer) pointing at ``evil.py``,
    which creates a marker file when imported. ``known_type=False`` also removes the model type and
    tokenizer class, so only the remote code could load it."""
    from megatron_rl.testing import tiny_model

    model = tiny_model(tmp_path / "model")
    marker = tmp_path / "remote_code_ran"
    (model / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig, PreTrainedTokenizerFast, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    if not known_type:
        config["model_type"] = "evil"
        config.pop("architectures", None)
    (model / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    if not known_type:
        tokenizer.pop("tokenizer_class", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return model, marker


def _loaders():
    """Every way the project opens a model directory with transformers (vLLM is left out: it starts
    an engine; the source scan checks that its LLM(...) call passes no trust_remote_code)."""
    from megatron_rl.checkpoint.convert import hf_to_megatron
    from megatron_rl.checkpoint.hf_io import load_hf_config
    from megatron_rl.evaluation.runner import EvalConfig, run_eval
    from megatron_rl.rollout.hf_engine import TransformersEngine
    from megatron_rl.trainer.setup import load_tokenizer_and_config

    def evaluation(model: Path) -> None:
        """An evaluation run, which also must write nothing outside its output folder."""
        data = make_tasks(model.parent / "tasks", num_train=1, num_test=1)["test"]
        out = model.parent / "eval"
        before = _files_under(model.parent)
        run_eval(EvalConfig(model=str(model), data=(str(data),), output_dir=str(out), backend="hf", max_tokens=4),
                 progress=False)
        written = _files_under(model.parent) - before
        assert written and all(out in path.parents for path in written), written

    return {
        "trainer: load_tokenizer_and_config": load_tokenizer_and_config,
        "converter: load_hf_config": load_hf_config,
        "converter: hf_to_megatron": lambda model: hf_to_megatron(model, model.parent / "megatron"),
        "rollout / eval hf backend: TransformersEngine": TransformersEngine,
        "eval: run_eval": evaluation,
    }


@pytest.fixture
def non_interactive(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdin at end of file, as in a batch job: transformers asks before running remote code, and no
    one answers."""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))


def test_remote_code_is_not_run_for_a_known_model_type(tmp_path: Path, non_interactive) -> None:
    model, marker = _remote_code_model(tmp_path, known_type=True)
    from megatron_rl.trainer.setup import load_tokenizer_and_config

    tokenizer, config = load_tokenizer_and_config(model)
    assert type(config).__name__ == "Qwen2Config" and "Evil" not in type(tokenizer).__name__
    for name, load in _loaders().items():
        if name != "converter: hf_to_megatron":  # a full conversion: slow, and its config load is tested above
            load(model)
        assert not marker.exists(), f"{name} ran the model directory's own code"


def test_remote_code_only_model_is_refused_without_running_it(tmp_path: Path, non_interactive) -> None:
    model, marker = _remote_code_model(tmp_path, known_type=False)
    for name, load in _loaders().items():
        with pytest.raises(ValueError, match="contains custom code which must be executed"):
            load(model)
        assert not marker.exists(), f"{name} ran the model directory's own code"


# --- Paths -----------------------------------------------------------------------------------------


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_safe_child_keeps_names_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "out"
    assert safe_child(root, "train_x.parquet", field="f") == root / "train_x.parquet"
    assert safe_child(root, "a/b.json", field="f") == root / "a" / "b.json"
    for name in ("../x", "a/../../x", "/etc/passwd", "", "..", "."):
        with pytest.raises(ValueError, match=r"^f="):
            safe_child(root, name, field="f")
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # a symlink inside the folder that leads out of it
    with pytest.raises(ValueError, match="leads outside"):
        safe_child(root, "link/x", field="f")
    for name in ("../x", "a/b", "/x", ".hidden", "-rf", "a..b", "", "x\x00"):
        with pytest.raises(ValueError, match=r"^--name="):
            check_file_name("--name", name)
    assert check_file_name("--name", "medqa_v2.1") == "medqa_v2.1"


def _raw_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prepare_data_names_cannot_leave_the_output_folder(tmp_path: Path, capsys) -> None:
    raw = _raw_file(tmp_path / "train_mediq.jsonl", [
        {"problem": f"Q{i}?", "options": {"A": "x", "B": "y"}, "answer": "A", "split": "../../escape"}
        for i in range(3)])  # fmt: skip
    raw2 = _raw_file(tmp_path / "train_mmlu.jsonl", [{"question": "Which?", "options": ["a", "b"], "answer": "B"}])
    out = tmp_path / "deep" / "out"
    before = _files_under(tmp_path)
    for option in (["--mix-name", "../../escape"], ["--mix-name", "/tmp/escape"], ["--name", "../escape"]):
        code = cli.main(["prepare-data", "--input", str(raw), str(raw2), "--output-dir", str(out), *option])
        assert code == 2
        assert f"{option[0]}={option[1]!r} must be a plain file name" in capsys.readouterr().err
        assert _files_under(tmp_path) == before
    # A data field ("split") is never part of a file name: hostile values fall back to the file's split.
    summary = prepare([raw, raw2], out, PrepareOptions(mix_name="mix"))
    assert sorted(summary.written) == ["train_mediq.parquet", "train_mix.parquet", "train_mmlu_pro.parquet"]
    assert {p for p in _files_under(tmp_path) - before} == {out / name for name in summary.written}


def test_hostile_data_source_and_task_names_are_refused(tmp_path: Path) -> None:
    record = {"data_source": "../../etc/x", "prompt": [{"role": "user", "content": "q"}],
              "reward_model": {"ground_truth": "A"}}
    for source in ("../../etc/x", "/etc/passwd", "MedIQ/../../x"):
        with pytest.raises(RowError, match=r"data_source=.* is not a known data_source"):
            row_from_record({**record, "data_source": source}, where="f.parquet: row 0")
    with pytest.raises(ValueError, match=r"difficulty='\.\./x' is not allowed"):
        make_tasks(tmp_path / "tasks", difficulty="../x")
    assert not os.path.exists(tmp_path / "x") and not (tmp_path / "tasks").exists()


def test_a_weight_index_cannot_point_outside_the_model_directory(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from megatron_rl.checkpoint.hf_io import SafetensorsSource

    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match=r"weight_map='\.\./outside\.safetensors' leads outside the folder"):
        SafetensorsSource(model)
