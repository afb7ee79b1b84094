"""Prompts ready for rollout: read, checked, chat-templated once, tokenised, length-filtered, batched.

::

    dataset = PromptDataset(cfg.train_files, tokenizer, max_prompt_length=cfg.max_prompt_length)
    print(dataset.summary())
    sampler = PromptSampler(len(dataset), cfg.batch_size, seed=cfg.seed)
    for batch in batches(dataset, sampler):          # one epoch of list[PromptExample]
        ...
        checkpoint["sampler"] = sampler.state_dict()  # resume: sampler.load_state_dict(...)

A prompt is rendered exactly once. Rows that a chat template has rendered already (the Med-U1
files: one user message holding "<|im_start|>system ...<|im_start|>assistant\\n") are used as
they are; rows of chat messages go through the tokenizer's chat template with the generation
prompt. With ``prompt_template="model"`` (``data.prompt_template``) a rendered row is first read
back into its messages (:func:`messages_of_rendered`), so every prompt gets the model's own chat
template. Prompts longer than ``max_prompt_length`` tokens are left out and reported, never cut.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_rl.data.config import PROMPT_TEMPLATES, DataConfig
from megatron_rl.data.schema import PromptRow, SkippedRow, field_error, read_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Markers of a rendered template that are single special tokens in their model family's
# tokenizer. A templated prompt holding one that the tokenizer lacks was made for another family.
FAMILY_TOKENS = ("<|im_start|>", "<|start_header_id|>", "<|begin_of_text|>")


@dataclass(frozen=True)
class PromptExample:
    """One prompt as the rollout engine receives it."""

    row: PromptRow
    file: str
    row_index: int
    """Index of the row in ``file`` (counting rows that were skipped or filtered)."""
    prompt_text: str
    """The rendered prompt: the chat template applied, generation prompt open."""
    prompt_token_ids: tuple[int, ...]
    """``tokenizer(prompt_text, add_special_tokens=False)``; at most max_prompt_length ids."""


@dataclass(frozen=True)
class FilteredPrompt:
    """A prompt left out because it has more than ``max_prompt_length`` tokens."""

    file: str
    row: int
    num_tokens: int


class PromptDataset:
    """The prompts of some parquet files, rendered and tokenised up front (a few thousand rows
    take seconds; every example is then a list lookup)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_prompt_length: int,
        skip_bad_rows: bool = False,
        prompt_template: str = "row",
    ) -> None:
        """Read ``paths`` in order (a bad row raises ``schema.RowError`` naming file, row, field and
        value, unless ``skip_bad_rows``) and keep the prompts of at most ``max_prompt_length`` tokens.
        ``prompt_template``: 'row' or 'model', see ``DataConfig.prompt_template``."""
        if isinstance(paths, (str, Path)) or not paths:
            raise ValueError(f"paths={paths!r} must be a non-empty list of parquet files")
        if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1:
            raise ValueError(f"max_prompt_length={max_prompt_length!r} must be a positive integer")
        if prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_template={prompt_template!r} is not allowed; choose one of {PROMPT_TEMPLATES}")
        self.files = [str(Path(path)) for path in paths]
        self.max_prompt_length = max_prompt_length
        self.skipped: list[SkippedRow] = []
        self.filtered: list[FilteredPrompt] = []
        self.examples: list[PromptExample] = []

        rows, files, row_indices = [], [], []
        check = prompt_check(tokenizer, prompt_template)
        for file in self.files:
            file_rows, file_skipped = read_rows(file, skip_bad_rows=skip_bad_rows, check=check)
            if prompt_template == "model":
                file_rows = [as_messages(row) for row in file_rows]
            rows += file_rows
            files += [file] * len(file_rows)
            row_indices += _kept_indices(len(file_rows), file_skipped)
            self.skipped += file_skipped
        texts = render_prompts(rows, tokenizer)
        token_ids = tokenize(texts, tokenizer)
        for row, file, index, text, ids in zip(rows, files, row_indices, texts, token_ids, strict=True):
            if len(ids) > max_prompt_length:
                self.filtered.append(FilteredPrompt(file, index, len(ids)))
            else:
                self.examples.append(PromptExample(row, file, index, text, tuple(ids)))

    @classmethod
    def from_config(
        cls, config: DataConfig, tokenizer: PreTrainedTokenizerBase, *, split: str = "train"
    ) -> PromptDataset:
        """The ``train_files`` (split="train") or ``val_files`` (split="val") of ``config``."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not allowed; choose one of 'train', 'val'")
        paths = config.train_files if split == "train" else config.val_files
        if not paths:
            raise ValueError(f"data.{split}_files is empty; name at least one parquet file")
        return cls(paths, tokenizer, max_prompt_length=config.max_prompt_length, skip_bad_rows=config.skip_bad_rows,
                   prompt_template=config.prompt_template)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptExample:
        return self.examples[index]

    @property
    def num_filtered(self) -> int:
        """Prompts left out for being longer than ``max_prompt_length`` tokens."""
        return len(self.filtered)

    def summary(self) -> str:
        """One line per file: kept, too long (with the longest prompt's length), and skipped rows
        counted by the field at fault."""
        kept = Counter(example.file for example in self.examples)
        too_long = Counter(item.file for item in self.filtered)
        longest: dict[str, int] = {}
        for item in self.filtered:
            longest[item.file] = max(longest.get(item.file, 0), item.num_tokens)
        lines = []
        for file in self.files:
            line = f"{file}: {kept[file]} kept, {too_long[file]} too long (> {self.max_prompt_length} tokens"
            line += f"; longest {longest[file]})" if file in longest else ")"
            reasons = Counter(_field_of(item.reason) for item in self.skipped if item.file == file)
            skipped = f"{sum(reasons.values())} skipped"
            if reasons:
                skipped += " (" + ", ".join(f"{field}: {count}" for field, count in sorted(reasons.items())) + ")"
            lines.append(f"{line}, {skipped}")
        return "\n".join(lines)


def check_datasets(train_set: PromptDataset, val_set: PromptDataset | None, config: DataConfig, *,
                   report: bool = True) -> None:
    """At the start of a run: print (``report``) how many prompts each file kept and dropped, and
    refuse a training set that cannot fill one batch of ``config.batch_size`` prompts (with
    ``drop_last``; an empty one always) or an empty validation set, naming the length filter and
    the field to raise when it is the cause.

    Raises:
        ValueError: too few prompts; the message names data.batch_size, data.max_prompt_length and
            the length that keeps every prompt.
    """
    limit = f"data.max_prompt_length={config.max_prompt_length}"
    if report:
        for name, dataset in (("training", train_set), ("validation", val_set)):
            if dataset is not None:
                lines = "\n".join(f"  {line}" for line in dataset.summary().splitlines())
                print(f"{name} prompts ({limit}: longer ones are dropped):\n{lines}", flush=True)
    needed = len(train_set) == 0 or (config.drop_last and len(train_set) < config.batch_size)
    if needed:
        raise ValueError(f"data.batch_size={config.batch_size} needs at least {config.batch_size} training prompts "
                         f"but the training set holds {len(train_set)}{_dropped_because(train_set, limit)}")
    if val_set is not None and len(val_set) == 0:
        raise ValueError(f"no validation prompt was kept{_dropped_because(val_set, limit)}")


def _dropped_because(dataset: PromptDataset, limit: str) -> str:
    """Why a dataset holds fewer prompts than its files: the length filter (and the length that keeps
    every prompt), rows skipped as bad, or neither."""
    total = len(dataset) + dataset.num_filtered + len(dataset.skipped)
    parts = []
    if dataset.num_filtered:
        longest = max(item.num_tokens for item in dataset.filtered)
        parts.append(f"{dataset.num_filtered} of {total} prompts were dropped as longer than {limit} tokens "
                     f"(the longest has {longest}); raise data.max_prompt_length (to {longest} to keep them "
                     "all) or lower data.batch_size")
    if dataset.skipped:
        parts.append(f"{len(dataset.skipped)} bad rows were skipped (data.skip_bad_rows)")
    return (": " + "; ".join(parts)) if parts else f" from {total} rows"


def render_prompts(rows: Sequence[PromptRow], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each row's prompt text: a templated row's content as is (rows read with
    :func:`template_family_check`, which refuses one rendered for another model family), other rows
    through the chat template (with the generation prompt), in one batched call."""
    texts: list[str | None] = [row.messages[0][1] if row.is_templated else None for row in rows]
    todo = [i for i, text in enumerate(texts) if text is None]
    if todo:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{len(todo)} prompts are chat messages but the tokenizer has no chat template")
        conversations = [[{"role": role, "content": content} for role, content in rows[i].messages] for i in todo]
        rendered = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        for i, text in zip(todo, rendered, strict=True):
            texts[i] = text
    return texts  # type: ignore[return-value]  # every None was filled


def tokenize(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each text, in one batched call; no special tokens added (the chat template
    wrote them into the text), no truncation, no padding."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def template_family_check(tokenizer: PreTrainedTokenizerBase) -> Callable[[PromptRow, str], None]:
    """A ``read_rows`` check refusing a templated row (``RowError`` naming file, row and field)
    whose template marker is no token of ``tokenizer``: it was rendered for another model family."""
    missing = [marker for marker in FAMILY_TOKENS if marker not in tokenizer.get_vocab()]

    def check(row: PromptRow, where: str) -> None:
        if row.is_templated:
            content = row.messages[0][1]
            for marker in missing:
                if marker in content:
                    raise field_error(where, "prompt[0].content", content, f"is chat-templated with {marker!r}, "
                                      "which is not a token of this tokenizer: rendered for another model family")

    return check


# A rendered prompt read back into its messages: ChatML (Qwen, SmolLM2, ...) and Llama 3 markup.
_CHATML_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n?", re.DOTALL)
_CHATML_OPEN = "<|im_start|>assistant\n"
_LLAMA3_TURN = re.compile(r"<\|start_header_id\|>(system|user|assistant)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
                          re.DOTALL)
_LLAMA3_OPEN = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def messages_of_rendered(text: str) -> tuple[tuple[str, str], ...]:
    """The (role, content) messages of a prompt that a ChatML or Llama 3 chat template rendered, its
    open assistant turn (the generation prompt) left out, so another chat template can render them::

        "<|im_start|>system\\nS<|im_end|>\\n<|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\n"
        -> (("system", "S"), ("user", "Q"))

    Raises:
        ValueError: the text is not whole turns of one of these two markups followed by at most an
            empty assistant turn (text outside the turns, a started answer, Mistral's [INST], ...).
    """
    if "<|im_start|>" in text:
        turn, open_turn, head = _CHATML_TURN, _CHATML_OPEN, ""
    elif "<|start_header_id|>" in text:
        turn, open_turn, head = _LLAMA3_TURN, _LLAMA3_OPEN, "<|begin_of_text|>"
    else:
        raise ValueError("is rendered with a markup other than ChatML (<|im_start|>) or Llama 3 "
                         "(<|start_header_id|>), which cannot be read back into messages")
    body = text.removeprefix(head)
    body = body[: -len(open_turn)] if body.endswith(open_turn) else body
    messages, position = [], 0
    for match in turn.finditer(body):
        if match.start() != position:
            break
        messages.append((match.group(1), match.group(2)))
        position = match.end()
    if position != len(body) or not messages:
        raise ValueError(f"has text outside whole chat turns at character {position} "
                         f"({body[position:position + 40]!r}); cannot read it back into messages")
    return tuple(messages)


def as_messages(row: PromptRow) -> PromptRow:
    """``row`` with a rendered prompt replaced by its messages (:func:`messages_of_rendered`);
    a row of chat messages as it is."""
    if not row.is_templated:
        return row
    return replace(row, messages=messages_of_rendered(row.messages[0][1]))


def prompt_check(tokenizer: PreTrainedTokenizerBase, prompt_template: str) -> Callable[[PromptRow, str], None]:
    """The ``read_rows`` check of ``data.prompt_template``: 'row' refuses a rendered row of another
    model family (:func:`template_family_check`); 'model' refuses a rendered row that cannot be read
    back into messages. Either raises ``RowError`` naming file, row and field."""
    if prompt_template == "row":
        return template_family_check(tokenizer)

    def check(row: PromptRow, where: str) -> None:
        if row.is_templated:
            try:
                messages_of_rendered(row.messages[0][1])
            except ValueError as err:
                raise field_error(where, "prompt[0].content", row.messages[0][1],
                                  f"{err} (data.prompt_template=model)") from None

    return check


def _kept_indices(num_kept: int, skipped: Sequence[SkippedRow]) -> list[int]:
    """Row indices in the file of the rows ``read_rows`` returned (in order, skipped ones left out)."""
    left_out = {item.row for item in skipped}
    indices = [i for i in range(num_kept + len(left_out)) if i not in left_out]
    assert len(indices) == num_kept, (num_kept, sorted(left_out))
    return indices


def _field_of(reason: str) -> str:
    """The field a schema error names: "reward_model.ground_truth=None must be ..." -> its name."""
    return reason.split("=", 1)[0]


class PromptSampler:
    """Seeded, resumable batches of dataset indices.

    Epoch ``e`` visits the indices in the order ``random.Random(f"{seed}:{e}")`` shuffles them
    into (file order when ``shuffle`` is False), in batches of ``batch_size``. Iterating yields
    the remaining batches of the current epoch and then moves to the next epoch, so ``for batch in
    sampler`` is one epoch and each new loop the next. The state (epoch, position) always points
    at the next batch to hand out, so a sampler restored from ``state_dict()`` yields exactly the
    batches the saved one would have.
    """

    def __init__(
        self, num_examples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True
    ) -> None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples={num_examples!r} must be a positive integer (is the dataset empty?)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if drop_last and batch_size > num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than num_examples={num_examples}: with drop_last "
                "every epoch would be empty"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # examples of the current epoch's order handed out so far
        self._order: list[int] | None = None  # cache of epoch_order(self.epoch)

    @classmethod
    def from_config(cls, num_examples: int, config: DataConfig) -> PromptSampler:
        return cls(num_examples, config.batch_size, shuffle=config.shuffle, seed=config.seed,
                   drop_last=config.drop_last)  # fmt: skip

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch_order(self, epoch: int) -> list[int]:
        """Every index once, in the order epoch ``epoch`` visits them."""
        order = list(range(self.num_examples))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch's batches; the state advances as each batch is handed out."""
        epoch = self.epoch
        while self.epoch == epoch:
            if self._order is None:
                self._order = self.epoch_order(self.epoch)
            start = self.position
            batch = self._order[start : start + self.batch_size]
            self._advance(start + len(batch))
            yield batch

    def _advance(self, position: int) -> None:
        """Move past a handed-out batch; roll over to the next epoch when no batch is left."""
        remaining = self.num_examples - position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        else:
            self.position = position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where the saved sampler stopped. The seed and the number of examples must
        match: otherwise the saved position points into a different order or different data."""
        missing = sorted({"epoch", "position", "seed", "num_examples"} - set(state))
        if missing:
            raise ValueError(f"sampler state {state!r} lacks {', '.join(missing)}")
        for key in ("seed", "num_examples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={getattr(self, key)!r}: "
                    "the data or the seed changed since the state was saved, so it cannot be resumed"
                )
        epoch, position = state["epoch"], state["position"]
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"sampler state epoch={epoch!r} must be an integer >= 0")
        if not isinstance(position, int) or not 0 <= position < self.num_examples:
            raise ValueError(f"sampler state position={position!r} must be an integer in [0, {self.num_examples})")
        self.epoch, self._order = epoch, None
        self._advance(position)  # a state saved with another batch_size may sit at an epoch's end


def batches(dataset: PromptDataset, sampler: PromptSampler) -> Iterator[list[PromptExample]]:
    """The sampler's next epoch (the rest of the current one) as lists of examples."""
    if sampler.num_examples != len(dataset):
        raise ValueError(f"sampler has num_examples={sampler.num_examples} but the dataset has {len(dataset)}")
    examples = dataset.examples
    for indices in sampler:
        yield [examples[i] for i in indices]
