"""Every recipe in examples/ loads; the Med-U1 recipe is the paper's script (Monncyann/Med-U1
scripts/train/run_medu1.sh) in every setting that is not a memory mechanism, and the documented
`prepare-data --do-normal` commands write the files it names; the config sections reject bad values
by name."""

import collections
import json
import re
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from megatron_rl.cli import main as cli_main
from megatron_rl.config import load_config
from megatron_rl.trainer.config import TrainerConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
MEDU1_3B = REPO / "examples" / "medu1_qwen2.5_3b.yaml"
# docs/data.md, "The files of the Med-U1 recipe": the commands, as documented
NORMAL_COMMANDS = (
    "megatron-rl prepare-data --do-normal --name medoption --split train --output-dir data/medu1_normal "
    "--input Med-U1/deepscaler/data/train/medoption.json",
    "megatron-rl prepare-data --do-normal --name medoption --split validation --output-dir data/medu1_normal "
    "--input Med-U1/deepscaler/data/test/medoption.json",
)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.data.batch_size * cfg.rollout.n % cfg.algorithm.micro_batch_size == 0


def test_medu1_recipe_is_the_papers_script():
    """Each row of the comparison with run_medu1.sh (over verl's ppo_trainer.yaml defaults)."""
    cfg = load_config(MEDU1_3B)
    # data: the "normal" multiple-choice mix only, validated on the same preparation's validation split
    assert cfg.data.train_files == ("data/medu1_normal/train_medoption.parquet",)
    assert cfg.data.val_files == ("data/medu1_normal/medoption.parquet",)
    assert (cfg.data.batch_size, cfg.data.max_prompt_length, cfg.data.shuffle, cfg.data.drop_last) == (4, 1024, True, True)
    # validation: n_val=4 at val_temperature 0.6, not before training, every 350 steps; save every 450
    assert (cfg.rollout.val_n, cfg.rollout.val_temperature) == (4, 0.6)
    assert cfg.trainer.val_before_train is False
    assert (cfg.trainer.test_freq, cfg.trainer.save_freq) == (350, 450)
    # one epoch
    assert cfg.trainer.total_epochs == 1
    # rollouts, loss, optimizer
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (8, 0.6, 1.0, -1)
    assert cfg.rollout.max_response_length == 4096
    assert (cfg.algorithm.advantage, cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.clip_c) == (
        "grpo", 0.2, 0.2, None)
    assert (cfg.algorithm.kl_coef, cfg.algorithm.kl_kind, cfg.algorithm.entropy_coef) == (0.001, "low_var_kl", 0.001)
    assert (cfg.algorithm.loss_agg, cfg.algorithm.ppo_epochs, cfg.algorithm.mini_batch_size) == ("token-mean", 1, 0)
    assert not (cfg.algorithm.dynamic_sampling or cfg.algorithm.overlong_filter)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (1e-6, 0, 0.01)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.clip_grad) == (0.9, 0.999, 1.0)
    # reward: discrete, Merge, threshold 45, scale 100, check_think
    reward = cfg.reward
    assert (reward.reward_type, reward.reward_metric, reward.threshold, reward.scale, reward.check_think) == (
        "discrete", "merge", 45.0, 100.0, True)
    assert (cfg.trainer.sft_warmup_steps, cfg.data.builtin_tasks) == (0, "")


def test_length_recipes_differ_from_the_medu1_recipe_only_in_data_and_reward():
    base = asdict(load_config(MEDU1_3B))
    for name, data_dir in (("medu1_qwen2.5_3b_length_exact.yaml", "data/medu1_exact"),
                           ("medu1_qwen2.5_3b_length_max.yaml", "data/medu1_max")):
        variant = asdict(load_config(MEDU1_3B.with_name(name)))
        changed = {(section, key) for section in base for key in base[section]
                   if base[section][key] != variant[section][key]}
        assert {section for section, key in changed} <= {"data", "reward"} | {"trainer"}, changed
        assert {key for section, key in changed if section == "trainer"} == {"output_dir"}, changed
        assert variant["data"]["train_files"] == (f"{data_dir}/train_medoption.parquet",)
        assert variant["data"]["val_files"] == (f"{data_dir}/medoption.parquet",)


def test_7b_recipe_is_the_3b_recipe_split_over_two_gpus():
    base, big = asdict(load_config(MEDU1_3B)), asdict(load_config(MEDU1_3B.with_name("medu1_qwen2.5_7b.yaml")))
    changed = {(section, key) for section in base for key in base[section] if base[section][key] != big[section][key]}
    assert changed == {("model", "path"), ("parallel", "tp"), ("algorithm", "micro_batch_size"),
                       ("trainer", "output_dir")}
    assert (big["parallel"]["tp"], big["algorithm"]["micro_batch_size"]) == (2, 2)


def test_quickstart_validates_before_training_and_runs_by_steps():
    cfg = load_config(REPO / "examples" / "quickstart.yaml")
    assert (cfg.trainer.val_before_train, cfg.trainer.total_epochs, cfg.trainer.total_steps) == (True, 0, 60)
    assert (cfg.rollout.val_n, cfg.rollout.val_temperature) == (1, 0.0)


def _raw(source: str, index: int) -> dict:
    """A record in Med-U1's raw layout of ``source`` (deepscaler/data/*/medoption.json)."""
    options = {"A": f"option a{index}", "B": f"option b{index}", "C": f"option c{index}"}
    question = f"{source} question {index}?"
    if source == "MedIQ":
        return {"Source": source, "id": index, "problem": question, "options": options, "answer": "B"}
    return {"Source": source, "problem": question, "choices": options, "answer": "C"}


def test_documented_normal_preparation_writes_the_files_the_recipe_names(tmp_path, monkeypatch):
    """The docs' commands on a small Med-U1-shaped pair of files write exactly the recipe's train and
    validation files: every row without a length instruction (num_tokens -1), its source kept."""
    text = " ".join((REPO / "docs" / "data.md").read_text().replace("\\\n", " ").split())
    for command in NORMAL_COMMANDS:
        assert command in text, command
    sources = ("MedXpertQA", "MedIQ", "EHRNoteQA")
    for split, count in (("train", 5), ("test", 2)):
        raw = tmp_path / "Med-U1" / "deepscaler" / "data" / split / "medoption.json"
        raw.parent.mkdir(parents=True)
        offset = 0 if split == "train" else 100
        raw.write_text(json.dumps([_raw(s, offset + i) for s in sources for i in range(count)]))
    monkeypatch.chdir(tmp_path)
    for command in NORMAL_COMMANDS:
        assert cli_main(command.split()[1:]) == 0
    cfg = load_config(MEDU1_3B)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "data").rglob("*.parquet"))
    assert written == sorted([*cfg.data.train_files, *cfg.data.val_files])
    for path, count in ((cfg.data.train_files[0], 5), (cfg.data.val_files[0], 2)):
        rows = pq.read_table(tmp_path / path).to_pylist()
        assert collections.Counter(row["data_source"] for row in rows) == dict.fromkeys(sources, count)
        assert {row["reward_model"]["num_tokens"] for row in rows} == {-1}
        assert not any(re.search(r"Think for", m["content"]) for row in rows for m in row["prompt"])


def test_normal_validation_file_from_the_shipped_raw_files(tmp_path, medu1_dir):
    """The shipped raw MedIQ and MedXpertQA files are the validation records of Med-U1's
    medoption.json but for EHRNoteQA: prepared as documented, 115 + 221 rows, no budgets."""
    raw = medu1_dir / "raw"
    out = tmp_path / "data" / "medu1_normal"
    assert cli_main(["prepare-data", "--do-normal", "--name", "medoption", "--split", "validation",
                     "--output-dir", str(out), "--input", str(raw / "mediq.json"), str(raw / "medxpertqa.json")]) == 0
    assert sorted(p.name for p in out.iterdir()) == [Path(load_config(MEDU1_3B).data.val_files[0]).name]
    rows = pq.read_table(out / "medoption.parquet").to_pylist()
    assert collections.Counter(row["data_source"] for row in rows) == {"MedIQ": 115, "MedXpertQA": 221}
    assert {row["reward_model"]["num_tokens"] for row in rows} == {-1}


@pytest.mark.parametrize(("override", "message"), [
    ("rollout.n=0", "rollout.n=0 must be >= 1"),
    ("algorithm.advantage=ppo", "algorithm.advantage='ppo' is not allowed"),
    ("trainer.resume=latest", "trainer.resume='latest' is not allowed"),
    ("algorithm.loss_agg=mean", "algorithm.loss_agg='mean' is not allowed"),
    ("data.builtin_tasks=hard", "data.builtin_tasks='hard' is not allowed"),
    ("trainer.totl_steps=3", "unknown config key 'trainer.totl_steps'"),
    ("rollout.val_n=0", "rollout.val_n=0 must be >= 1"),
    ("rollout.val_n=4", "rollout.val_n=4 needs rollout.val_temperature > 0"),
    ("trainer.total_epochs=-1", "trainer.total_epochs=-1 must be >= 0"),
    ("trainer.val_before_train=maybe", "trainer.val_before_train: Value 'maybe' is not a valid bool"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_val_before_train_must_be_a_bool():
    with pytest.raises(ValueError, match="trainer.val_before_train=1 must be true or false"):
        TrainerConfig(val_before_train=1)
