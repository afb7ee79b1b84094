"""PromptDataset, PromptSampler and DataConfig: on the real Med-U1 files and on hand-made parquet files."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_rl.config import load_config, to_yaml
from megatron_rl.data.config import DataConfig
from megatron_rl.data.dataset import PromptDataset, PromptSampler, batches, check_datasets, messages_of_rendered
from megatron_rl.data.schema import PromptRow, RowError, write_rows
from megatron_rl.testing import tiny_model

MEDU1_NAMES = ("mediq", "medxpertqa", "medcalc", "huatuo")
NO_LIMIT = 10**9
# The Med-U1 prompts are Qwen2.5's chat template applied to a system and a user message.
QWEN_PROMPT = re.compile(
    r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n",
    re.DOTALL,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tiny Qwen2 tokenizer (1024 tokens, Qwen2.5 chat template), loaded as a trainer would."""
    return AutoTokenizer.from_pretrained(tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def medu1_paths(medu1_dir: Path) -> list[str]:
    return [str(medu1_dir / f"{name}.parquet") for name in MEDU1_NAMES]


@pytest.fixture(scope="module")
def medu1_dataset(medu1_paths: list[str], tokenizer) -> PromptDataset:
    return PromptDataset(medu1_paths, tokenizer, max_prompt_length=NO_LIMIT)


@pytest.fixture(scope="module")
def reference(medu1_paths: list[str], tokenizer) -> dict[str, dict[str, list]]:
    """Per file, read with pyarrow alone: prompt contents, ground truths, and token ids from one
    tokenizer call per prompt (no schema module, no batching)."""
    out = {}
    for path in medu1_paths:
        table = pq.read_table(path, columns=["prompt", "reward_model"]).to_pylist()
        contents = [record["prompt"][0]["content"] for record in table]
        out[path] = {
            "contents": contents,
            "truths": [record["reward_model"]["ground_truth"] for record in table],
            "ids": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in contents],
        }
    return out


def _examples_of(dataset: PromptDataset, path: str) -> list:
    return [example for example in dataset.examples if example.file == path]


# --- (a) the shipped Med-U1 files ---------------------------------------------------------


def test_medu1_prompts_are_used_as_stored(medu1_dataset: PromptDataset, reference: dict) -> None:
    assert medu1_dataset.num_filtered == 0 and medu1_dataset.skipped == []
    for path, ref in reference.items():
        examples = _examples_of(medu1_dataset, path)
        assert len(examples) == len(ref["contents"]) > 0, path
        assert [e.row_index for e in examples] == list(range(len(examples)))
        assert all(e.row.is_templated for e in examples), path
        assert [e.prompt_text for e in examples] == ref["contents"], path
        assert [list(e.prompt_token_ids) for e in examples] == ref["ids"], path
        assert [e.row.ground_truth for e in examples] == ref["truths"], path
    assert len(medu1_dataset) == 115 + 221 + 1047 + 1000


# --- (b) templated rows and chat-message rows give the same prompts ------------------------


def test_medu1_files_and_chat_message_form_read_identically(
    medu1_paths: list[str], medu1_dataset: PromptDataset, tokenizer, tmp_path: Path
) -> None:
    message_paths = []
    for path in medu1_paths:
        rows = []
        for example in _examples_of(medu1_dataset, path):
            match = QWEN_PROMPT.fullmatch(example.prompt_text)
            assert match, (path, example.row_index, example.prompt_text[:200])
            system, user = match.groups()
            rows.append(dataclasses.replace(example.row, messages=(("system", system), ("user", user))))
        message_paths.append(str(tmp_path / Path(path).name))
        assert write_rows(message_paths[-1], rows) == len(rows)

    as_messages = PromptDataset(message_paths, tokenizer, max_prompt_length=NO_LIMIT)
    assert len(as_messages) == len(medu1_dataset)
    for ours, theirs in zip(as_messages.examples, medu1_dataset.examples, strict=True):
        assert not ours.row.is_templated
        assert ours.prompt_text == theirs.prompt_text, (ours.file, ours.row_index)
        assert ours.prompt_token_ids == theirs.prompt_token_ids, (ours.file, ours.row_index)
        assert ours.row.ground_truth == theirs.row.ground_truth


# --- (c) length filtering -------------------------------------------------------------------


def test_prompts_over_the_limit_are_left_out_and_reported(medu1_paths: list[str], reference: dict, tokenizer) -> None:
    limit = 1024
    dataset = PromptDataset(medu1_paths, tokenizer, max_prompt_length=limit)
    too_long = {(path, i) for path, ref in reference.items() for i, ids in enumerate(ref["ids"]) if len(ids) > limit}
    assert 0 < len(too_long) < sum(len(ref["ids"]) for ref in reference.values())
    assert dataset.num_filtered == len(too_long)
    assert {(item.file, item.row) for item in dataset.filtered} == too_long
    assert all(item.num_tokens == len(reference[item.file]["ids"][item.row]) for item in dataset.filtered)
    for example in dataset.examples:  # kept prompts are whole, not cut to the limit
        assert list(example.prompt_token_ids) == reference[example.file]["ids"][example.row_index]
    summary = dataset.summary().splitlines()
    assert len(summary) == 4
    for path, line in zip(medu1_paths, summary, strict=True):
        num_long = sum(1 for p, _ in too_long if p == path)
        kept = len(reference[path]["ids"]) - num_long
        longest = max((len(ids) for ids in reference[path]["ids"]), default=0)
        long_part = f"; longest {longest})" if num_long else ")"
        assert line == f"{path}: {kept} kept, {num_long} too long (> {limit} tokens{long_part}, 0 skipped"


def test_the_start_of_a_run_reports_each_file_and_names_the_filter_when_too_few_prompts_are_left(
    tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "three.parquet"
    write_rows(path, [_row("Short?"), _row("A much longer question " * 20), _row("Also " * 30 + "long?")])
    lengths = [len(e.prompt_token_ids) for e in PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)]
    limit = min(lengths)  # keeps the short prompt only
    train = PromptDataset([path], tokenizer, max_prompt_length=limit)
    config = DataConfig(train_files=(str(path),), max_prompt_length=limit, batch_size=1)
    check_datasets(train, train, config)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"training prompts (data.max_prompt_length={limit}: longer ones are dropped):"
    assert out[1] == f"  {path}: 1 kept, 2 too long (> {limit} tokens; longest {max(lengths)}), 0 skipped"
    assert out[2].startswith("validation prompts") and len(out) == 4
    check_datasets(train, None, config, report=False)
    assert capsys.readouterr().out == ""

    with pytest.raises(ValueError) as info:  # the quickstart's batch on files it mostly filters out
        check_datasets(train, None, dataclasses.replace(config, batch_size=4), report=False)
    assert str(info.value) == (
        f"data.batch_size=4 needs at least 4 training prompts but the training set holds 1: 2 of 3 prompts were "
        f"dropped as longer than data.max_prompt_length={limit} tokens (the longest has {max(lengths)}); raise "
        f"data.max_prompt_length (to {max(lengths)} to keep them all) or lower data.batch_size")
    everything = PromptDataset([path], tokenizer, max_prompt_length=max(lengths))
    check_datasets(everything, None, dataclasses.replace(config, batch_size=3), report=False)  # raised: enough
    with pytest.raises(ValueError, match="but the training set holds 3 from 3 rows"):  # no filter to blame
        check_datasets(everything, None, dataclasses.replace(config, batch_size=4), report=False)
    check_datasets(train, None, dataclasses.replace(config, batch_size=4, drop_last=False), report=False)
    none_kept = PromptDataset([path], tokenizer, max_prompt_length=limit - 1)
    with pytest.raises(ValueError, match="no validation prompt was kept: 3 of 3 prompts were dropped"):
        check_datasets(train, none_kept, config, report=False)
    # an empty training set, even without drop_last
    with pytest.raises(ValueError, match="but the training set holds 0: 3 of 3 prompts were dropped"):
        check_datasets(none_kept, None, dataclasses.replace(config, drop_last=False), report=False)


def test_a_prompt_of_exactly_the_limit_is_kept(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "two.parquet"
    write_rows(path, [_row("Which vitamin deficiency causes scurvy?"), _row("What is the antidote for acetaminophen?")])
    lengths = [len(e.prompt_token_ids) for e in PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)]
    assert lengths[0] != lengths[1]
    limit = min(lengths)
    dataset = PromptDataset([path], tokenizer, max_prompt_length=limit)
    assert [e.row_index for e in dataset] == [lengths.index(limit)]
    assert [(f.row, f.num_tokens) for f in dataset.filtered] == [(lengths.index(max(lengths)), max(lengths))]


# --- (d) malformed files --------------------------------------------------------------------


def _row(question: str, source: str = "MedIQ", truth: str = "C") -> PromptRow:
    return PromptRow(data_source=source, messages=(("user", question),), ground_truth=truth, num_tokens=500)


def _record(question: str = "Which vitamin deficiency causes scurvy?", **changes) -> dict:
    record = _row(question).to_record()
    for key, value in changes.items():  # "reward_model.ground_truth" sets a nested field
        *parents, last = key.split(".")
        target = record
        for parent in parents:
            target = target[parent]
        target[last] = value
    return record


def _write_records(path: Path, records: list[dict], drop: str | None = None) -> Path:
    table = pa.Table.from_pylist(records)  # types inferred: a bad value makes a bad column type
    pq.write_table(table.drop_columns([drop]) if drop else table, path)
    return path


@pytest.mark.parametrize(
    ("records", "row", "field", "value"),
    [
        ([_record(**{"reward_model.num_tokens": "512"})], 0, "reward_model.num_tokens", "'512'"),
        ([_record(prompt="Which vitamin deficiency causes scurvy?")], 0, "prompt", "'Which vitamin"),
        ([_record(), _record(), _record(**{"reward_model.ground_truth": None})], 2,
         "reward_model.ground_truth", "None"),
        ([_record(), _record(data_source="PubMedQA")], 1, "data_source", "'PubMedQA'"),
    ],
    ids=["num_tokens-as-string", "prompt-as-string", "null-ground-truth", "unknown-data-source"],
)  # fmt: skip
def test_a_bad_row_names_file_row_field_and_value(
    tokenizer, tmp_path: Path, records: list[dict], row: int, field: str, value: str
) -> None:
    path = _write_records(tmp_path / "bad_rows.parquet", records)
    with pytest.raises(RowError) as info:
        PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)
    message = str(info.value)
    for part in ("bad_rows.parquet", f"row {row}:", f"{field}=", value):
        assert part in message, (part, message)


def test_a_missing_column_names_file_and_column(tokenizer, tmp_path: Path) -> None:
    path = _write_records(tmp_path / "no_reward.parquet", [_record()], drop="reward_model")
    with pytest.raises(ValueError, match=r"no_reward\.parquet: missing column\(s\) reward_model"):
        PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)


def test_skip_bad_rows_keeps_the_good_ones_and_says_why(tokenizer, tmp_path: Path) -> None:
    records = [
        _record("Which vitamin deficiency causes scurvy?"),
        _record(data_source="PubMedQA"),
        _record("Which nerve is injured in a fracture of the surgical neck of the humerus?"),
        _record(**{"reward_model.ground_truth": None}),
        _record("What is the first-line treatment for anaphylaxis?"),
    ]
    mixed = _write_records(tmp_path / "mixed.parquet", records)
    good = tmp_path / "good.parquet"
    write_rows(good, [_row("What is the antidote for acetaminophen overdose?")])

    with pytest.raises(RowError, match="row 1"):
        PromptDataset([mixed, good], tokenizer, max_prompt_length=NO_LIMIT)
    dataset = PromptDataset([mixed, good], tokenizer, max_prompt_length=NO_LIMIT, skip_bad_rows=True)
    assert [(Path(e.file).name, e.row_index) for e in dataset] == [
        ("mixed.parquet", 0), ("mixed.parquet", 2), ("mixed.parquet", 4), ("good.parquet", 0)
    ]  # fmt: skip
    assert dataset[1].row.messages[0][1].startswith("Which nerve")
    assert [(item.row, item.reason.split("=")[0]) for item in dataset.skipped] == [
        (1, "data_source"), (3, "reward_model.ground_truth")
    ]  # fmt: skip
    assert dataset.summary().splitlines() == [
        f"{mixed}: 3 kept, 0 too long (> {NO_LIMIT} tokens), 2 skipped (data_source: 1, reward_model.ground_truth: 1)",
        f"{good}: 1 kept, 0 too long (> {NO_LIMIT} tokens), 0 skipped",
    ]


def test_a_prompt_templated_for_another_model_family_is_refused(tokenizer, tmp_path: Path) -> None:
    llama = "<|start_header_id|>user<|end_header_id|>\n\nWhat causes scurvy?<|eot_id|>"
    path = tmp_path / "llama.parquet"
    write_rows(path, [_row(llama)])
    with pytest.raises(ValueError, match=r"templated with '<\|start_header_id\|>', which is not a token"):
        PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)


def test_chat_messages_need_a_chat_template(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "messages.parquet"
    write_rows(path, [_row("What causes scurvy?")])
    text = PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)[0].prompt_text
    assert text.endswith("<|im_start|>user\nWhat causes scurvy?<|im_end|>\n<|im_start|>assistant\n")
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(ValueError, match="1 prompts are chat messages but the tokenizer has no chat template"):
        PromptDataset([path], plain, max_prompt_length=NO_LIMIT)


# --- (d2) data.prompt_template: the model's own chat template -------------------------------


def test_rendered_prompts_read_back_into_their_messages() -> None:
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat causes scurvy?<|im_end|>\n"
    assert messages_of_rendered(chatml + "<|im_start|>assistant\n") == (
        ("system", "Be brief."), ("user", "What causes scurvy?"))
    assert messages_of_rendered(chatml) == (("system", "Be brief."), ("user", "What causes scurvy?"))
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat causes scurvy?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert messages_of_rendered(llama) == (("user", "What causes scurvy?"),)
    with pytest.raises(ValueError, match="text outside whole chat turns at character 0"):
        messages_of_rendered("Intro " + chatml)
    with pytest.raises(ValueError, match="text outside whole chat turns"):  # an answer already begun
        messages_of_rendered(chatml + "<|im_start|>assistant\n<think>")
    with pytest.raises(ValueError, match="markup other than ChatML"):
        messages_of_rendered("[INST] What causes scurvy? [/INST]")


def test_model_template_renders_medu1_prompts_as_they_are_stored_for_their_own_family(
    medu1_paths: list[str], medu1_dataset: PromptDataset, tokenizer
) -> None:
    # The tiny tokenizer carries Qwen2.5's template, the one the Med-U1 prompts were rendered with.
    again = PromptDataset(medu1_paths[:2], tokenizer, max_prompt_length=NO_LIMIT, prompt_template="model")
    stored = [e for e in medu1_dataset.examples if e.file in medu1_paths[:2]]
    assert len(again) == len(stored) > 0
    for ours, theirs in zip(again.examples, stored, strict=True):
        assert not ours.row.is_templated and [r for r, _ in ours.row.messages] == ["system", "user"]
        assert ours.prompt_text == theirs.prompt_text and ours.prompt_token_ids == theirs.prompt_token_ids


OTHER_TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_model_template_gives_a_model_of_another_family_its_own_tokens(tokenizer, tmp_path: Path) -> None:
    chatml = ("<|im_start|>system\nAnswer in <answer></answer>.<|im_end|>\n<|im_start|>user\nWhat causes "
              "scurvy?<|im_end|>\n<|im_start|>assistant\n")
    llama = "<|start_header_id|>user<|end_header_id|>\n\nWhat causes rickets?<|eot_id|>"
    path = tmp_path / "rendered.parquet"
    write_rows(path, [_row(chatml), _row("What causes beriberi?")])
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.chat_template = OTHER_TEMPLATE
    as_stored = PromptDataset([path], other, max_prompt_length=NO_LIMIT)  # 'row': the rendered text as it is
    assert as_stored[0].prompt_text == chatml
    own = PromptDataset([path], other, max_prompt_length=NO_LIMIT, prompt_template="model")
    assert [e.prompt_text for e in own] == [
        "[system] Answer in <answer></answer>.\n[user] What causes scurvy?\n[assistant] ",
        "[user] What causes beriberi?\n[assistant] ",
    ]
    assert own[0].prompt_token_ids == tuple(other(own[0].prompt_text, add_special_tokens=False)["input_ids"])
    assert own[0].row.ground_truth == "C" and own[0].row_index == 0

    write_rows(path, [_row(llama)])  # Llama 3 markup the Qwen tokenizer lacks: refused as is, re-rendered here
    with pytest.raises(ValueError, match="not a token of this tokenizer"):
        PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)
    qwen = PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT, prompt_template="model")[0].prompt_text
    assert qwen.endswith("<|im_start|>user\nWhat causes rickets?<|im_end|>\n<|im_start|>assistant\n")

    write_rows(path, [_row("[INST] What causes pellagra? [/INST]"), _row("What causes goitre?")])
    with pytest.raises(RowError, match=r"row 0: prompt\[0\]\.content=.*markup other than ChatML.*=model"):
        PromptDataset([path], other, max_prompt_length=NO_LIMIT, prompt_template="model")
    kept = PromptDataset([path], other, max_prompt_length=NO_LIMIT, prompt_template="model", skip_bad_rows=True)
    assert [e.row_index for e in kept] == [1] and [s.row for s in kept.skipped] == [0]


# --- (e) the sampler ------------------------------------------------------------------------


def _take(sampler: PromptSampler, num_batches: int) -> list[list[int]]:
    """The next ``num_batches`` batches, across epochs, as a training loop would draw them."""
    out: list[list[int]] = []
    while len(out) < num_batches:
        for batch in sampler:
            out.append(batch)
            if len(out) == num_batches:
                break
    return out


def test_epoch_order_is_pinned() -> None:
    # Pinned, not derived: a resumed run must see the order the saved run would have seen, so
    # the order random.Random("0:0") gives must not change between releases of this code.
    assert PromptSampler(10, 3, seed=0).epoch_order(0) == [5, 0, 3, 2, 7, 8, 6, 4, 1, 9]


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    first = _take(PromptSampler(50, 4, seed=7), 30)
    assert first == _take(PromptSampler(50, 4, seed=7), 30)
    assert first != _take(PromptSampler(50, 4, seed=8), 30)
    assert first[:12] != first[12:24]  # epochs 0 and 1 (12 batches each) are ordered differently


def test_every_epoch_visits_every_index_once() -> None:
    sampler = PromptSampler(10, 3, drop_last=False, seed=3)
    assert len(sampler) == 4
    for epoch in range(3):
        epoch_batches = list(sampler)
        assert [len(b) for b in epoch_batches] == [3, 3, 3, 1]
        flat = [i for b in epoch_batches for i in b]
        assert sorted(flat) == list(range(10))
        assert flat == sampler.epoch_order(epoch)
    assert sampler.state_dict() == {"epoch": 3, "position": 0, "seed": 3, "num_examples": 10}


def test_drop_last_drops_the_remainder() -> None:
    sampler = PromptSampler(10, 3, seed=3)
    assert len(sampler) == 3
    epoch_batches = list(sampler)
    assert [len(b) for b in epoch_batches] == [3, 3, 3]
    assert set(range(10)) - {i for b in epoch_batches for i in b} == {sampler.epoch_order(0)[9]}
    assert sampler.state_dict()["epoch"] == 1  # the short remainder does not hold the epoch open


def test_without_shuffle_batches_follow_file_order() -> None:
    sampler = PromptSampler(7, 3, shuffle=False, drop_last=False)
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_resumed_sampler_yields_what_an_uninterrupted_one_would(drop_last: bool) -> None:
    # 10 examples in batches of 3: 3 (drop_last) or 4 batches an epoch, so 10 batches cross 2-3 epochs.
    uninterrupted = _take(PromptSampler(10, 3, seed=5, drop_last=drop_last), 10)
    for k in range(10):
        before = PromptSampler(10, 3, seed=5, drop_last=drop_last)
        consumed = _take(before, k)
        after = PromptSampler(10, 3, seed=5, drop_last=drop_last)
        after.load_state_dict(dict(before.state_dict()))
        assert consumed + _take(after, 10 - k) == uninterrupted, k


def test_a_state_saved_mid_epoch() -> None:
    sampler = PromptSampler(10, 3, seed=5)
    next(iter(sampler))
    assert sampler.state_dict() == {"epoch": 0, "position": 3, "seed": 5, "num_examples": 10}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 6}, r"seed=6 but this sampler has seed=5"),
        ({"num_examples": 11}, r"num_examples=11 but this sampler has num_examples=10"),
        ({"position": 10}, r"position=10 must be an integer in \[0, 10\)"),
        ({"epoch": -1}, r"epoch=-1 must be an integer >= 0"),
    ],
)
def test_a_state_from_other_data_is_refused(change: dict, message: str) -> None:
    state = {**PromptSampler(10, 3, seed=5).state_dict(), **change}
    with pytest.raises(ValueError, match=message):
        PromptSampler(10, 3, seed=5).load_state_dict(state)


def test_sampler_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="num_examples=0 must be a positive integer"):
        PromptSampler(0, 4)
    with pytest.raises(ValueError, match="batch_size=5 is larger than num_examples=4"):
        PromptSampler(4, 5)
    assert list(PromptSampler(4, 5, drop_last=False, shuffle=False)) == [[0, 1, 2, 3]]


def test_batches_are_lists_of_examples(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "five.parquet"
    write_rows(path, [_row(f"Question number {i}?") for i in range(5)])
    dataset = PromptDataset([path], tokenizer, max_prompt_length=NO_LIMIT)
    sampler = PromptSampler(5, 2, seed=1)
    order = sampler.epoch_order(0)
    got = list(batches(dataset, sampler))
    assert got == [[dataset[order[0]], dataset[order[1]]], [dataset[order[2]], dataset[order[3]]]]
    with pytest.raises(ValueError, match="num_examples=6 but the dataset has 5"):
        next(batches(dataset, PromptSampler(6, 2)))


# --- (f) configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_prompt_length": 0}, r"data.max_prompt_length=0 must be >= 1"),
        ({"batch_size": -4}, r"data.batch_size=-4 must be >= 1"),
        ({"batch_size": 2.5}, r"data.batch_size=2.5 must be an integer"),
        ({"seed": "0"}, r"data.seed='0' must be an integer"),
        ({"shuffle": "yes"}, r"data.shuffle='yes' must be true or false"),
        ({"train_files": "a.parquet"}, r"data.train_files='a.parquet' must be a list of parquet paths"),
        ({"val_files": ["a.parquet", ""]}, r"data.val_files holds ''"),
        ({"prompt_template": "chatml"}, r"data.prompt_template='chatml' is not allowed; choose one of 'row', 'model'"),
    ],
)
def test_data_config_errors_name_field_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_data_config_from_overrides_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(overrides=["data.max_prompt_length=512", "data.train_files=[a.parquet,b.parquet]"])
    assert cfg.data == DataConfig(train_files=("a.parquet", "b.parquet"), max_prompt_length=512)
    assert DataConfig(train_files=["a.parquet"]).train_files == ("a.parquet",)  # lists become tuples
    (tmp_path / "run.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "run.yaml") == cfg
    with pytest.raises(ValueError, match="data.batch_size=0 must be >= 1"):
        load_config(overrides=["data.batch_size=0"])


def test_an_empty_builtin_tasks_on_the_command_line_switches_the_builtin_tasks_off() -> None:
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    assert load_config(quickstart).data.builtin_tasks == "easy"
    for empty in ("data.builtin_tasks=", "data.builtin_tasks=''"):
        cfg = load_config(quickstart, [empty, "data.train_files=[my.parquet]"])
        assert cfg.data.builtin_tasks == "" and cfg.data.train_files == ("my.parquet",)
    assert "builtin_tasks: ''" in to_yaml(cfg)  # the run's config.yaml reloads as it ran


def test_dataset_and_sampler_from_config(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "three.parquet"
    write_rows(path, [_row(f"Question number {i}?") for i in range(3)])
    cfg = DataConfig(train_files=(str(path),), batch_size=2, shuffle=False)
    dataset = PromptDataset.from_config(cfg, tokenizer)
    assert list(PromptSampler.from_config(len(dataset), cfg)) == [[0, 1]]
    with pytest.raises(ValueError, match="data.val_files is empty"):
        PromptDataset.from_config(cfg, tokenizer, split="val")
