"""Data knobs: which parquet files, how long a prompt may be, and how prompts are batched."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.validation import check_range

PROMPT_TEMPLATES = ("row", "model")
"""Values of ``data.prompt_template``."""


@dataclass(frozen=True)
class DataConfig:
    """Where the prompts come from and how they are batched. Defaults follow Med-U1's verl recipe."""

    train_files: tuple[str, ...] = ()
    """Training parquet files in the verl / Med-U1 schema (megatron_rl.data.schema), read in order.
    From YAML or the command line: ``data.train_files=[a.parquet,b.parquet]``."""

    val_files: tuple[str, ...] = ()
    """Validation parquet files, same schema; empty means no validation."""

    max_prompt_length: int = 1024
    """Longest prompt kept, in tokens after the chat template. Longer prompts are left out and
    reported (PromptDataset.filtered), never truncated: a cut prompt loses its question."""

    batch_size: int = 4
    """Prompts per training step (Med-U1's train_batch_size); each is sampled several times."""

    shuffle: bool = True
    """Visit the prompts in a fresh seeded order each epoch; False keeps file order."""

    seed: int = 0
    """Seed of the epoch orders: epoch e is shuffled by random.Random(f"{seed}:{e}")."""

    drop_last: bool = True
    """Leave out the last batch of an epoch when it would hold fewer than batch_size prompts."""

    skip_bad_rows: bool = False
    """Leave out rows that do not fit the schema (and report them) instead of stopping at the first."""

    prompt_template: str = "row"
    """Which chat template renders a prompt. 'row' (default): a row that a chat template rendered
    already (the Med-U1 files: one user message holding ``<|im_start|>...<|im_start|>assistant``) is
    used as it is, and refused when its markers are no tokens of the model's tokenizer (rendered for
    another model family); rows of chat messages go through the model's chat template. 'model': every
    prompt goes through the model's own chat template; a rendered row is first read back into its
    messages (ChatML or Llama 3 markup), so a model whose special tokens differ from Qwen's (Llama 3,
    Gemma, Mistral, ...) gets its own. See megatron_rl.data.dataset.render_prompts."""

    builtin_tasks: str | None = ""
    """Train on the project's own generated task set (megatron_rl.data.builtin), written to
    RUN_DIR/tasks: 'easy' (learnable by a tiny model in minutes) or 'standard' (Med-U1-style
    prompts); its test split becomes the validation set. '' (default): use train_files/val_files.
    ``data.builtin_tasks=`` (empty) on the command line also switches them off."""

    builtin_num_train: int = 512
    builtin_num_test: int = 64

    def __post_init__(self) -> None:
        for name in ("train_files", "val_files"):
            object.__setattr__(self, name, _check_files(f"data.{name}", getattr(self, name)))
        check_range("data.max_prompt_length", self.max_prompt_length, low=1, integer=True)
        check_range("data.batch_size", self.batch_size, low=1, integer=True)
        check_range("data.seed", self.seed, integer=True)
        if self.builtin_tasks is None:  # `data.builtin_tasks=` on the command line: off, as ''
            object.__setattr__(self, "builtin_tasks", "")
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"data.prompt_template={self.prompt_template!r} is not allowed; choose one of "
                             f"{', '.join(repr(t) for t in PROMPT_TEMPLATES)}")
        if self.builtin_tasks not in ("", "easy", "standard"):
            raise ValueError(f"data.builtin_tasks={self.builtin_tasks!r} is not allowed; choose '', 'easy' or 'standard'")
        if self.builtin_tasks and (self.train_files or self.val_files):
            raise ValueError("data.builtin_tasks and data.train_files/val_files exclude each other; set one")
        check_range("data.builtin_num_train", self.builtin_num_train, low=1, integer=True)
        check_range("data.builtin_num_test", self.builtin_num_test, low=1, integer=True)
        for name in ("shuffle", "drop_last", "skip_bad_rows"):
            _check_bool(f"data.{name}", getattr(self, name))


def _check_files(name: str, value: object) -> tuple[str, ...]:
    """A list or tuple of non-empty path strings, returned as a tuple (the config is frozen)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}={value!r} must be a list of parquet paths, e.g. [train.parquet]")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{name} holds {item!r}; every entry must be a non-empty path string")
    return tuple(value)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")
