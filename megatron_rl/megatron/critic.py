"""The critic of PPO (``algorithm.advantage='gae'``): a second Megatron-Core ``GPTModel`` whose output
layer is a scalar value head, its value forward, its update and its checkpoint.

    critic = build_critic(hf_config, tp_size=..., pp_size=..., pre_process=..., post_process=...)
    load_hf_into_critic(critic, hf_state, hf_config, tp_rank=..., tp_size=..., pp_rank=..., pp_size=...)
    critic = wrap_ddp(critic, cfg.critic.optim); optimizer = build_optimizer(critic, cfg.critic.optim)
    values = forward_values(critic, input_ids, mask=response_mask)                # (B, T-1), every rank
    advantages, returns = algorithms.gae(token_rewards, values, mask, gamma=..., lam=...)
    metrics = critic_train_step(critic, optimizer, critic_micro_batches(...), global_num_tokens=N)

The model. The policy's layout (TP/PP sizes, layer spec, dtype) and trunk: every decoder layer, the
final norm and the word embedding start from the policy's HF weights (the model RL starts from), as
verl's critic does (``critic.model.path`` defaults to the actor's). The language-model head is not
used: on the last pipeline stage ``output_layer`` is a :class:`ValueHead`, ``Linear(hidden, 1)`` with a
bias (verl's ``LinearForLastLayer``), replicated on every TP rank. The embedding is never tied to it
(a tied HF model's critic keeps its own untied embedding; nothing crosses the pipeline stages but
activations). The head starts as OpenAI's lm-human-preferences value and reward heads (also "The N+
implementation details of RLHF with PPO"): weight ~ N(0, 1 / (hidden + 1)), bias 0, drawn on the CPU
from a generator seeded with ``head_seed``, so every rank and every layout starts from the same head
(verl keeps ``nn.Linear``'s default uniform init when the HF checkpoint has no 1-row head). The first
values are then small (|V| ~ |final hidden| / sqrt(hidden), about 1 for RMS-normalised states) and
not 0, so the trunk gets gradients from the first update.

Values are read where verl reads them: ``V_t`` is the head applied to the hidden state at position
``t``, the prefix that ends just before the target token ``input_ids[:, t + 1]`` (the same alignment as
every (b, T-1) tensor of :class:`~megatron_rl.megatron.train_step.MicroBatch`): the value of the state in
which the t-th response action is chosen; the first response token's value comes from the last prompt
token's hidden state.

The update follows :mod:`megatron_rl.megatron.train_step`'s conventions: per micro-batch ``i`` on DP rank
``r`` the loss is its share of the global aggregate (``algorithm.aggregate`` with the caller's global
token and sequence counts), multiplied by ``num_microbatches * dp_size`` (undone by Megatron's schedule
and DDP average), metrics are summed on the last stage, over DP, and broadcast over PP, and a non-finite
loss or gradient on any rank skips the optimizer step everywhere.

The checkpoint is a Megatron distributed checkpoint (:mod:`megatron_rl.checkpoint.distributed`) of model
and optimizer in the sub-directory :data:`CRITIC_DIR` of a run checkpoint, loadable at another layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl import algorithms
from megatron_rl.megatron.forward import forward_groups, run_schedule, split_rows, stage_forward
from megatron_rl.megatron.optim import OptimizerSettings, unwrap_ddp
from megatron_rl.megatron.parallel import data_parallel_group, pipeline_parallel_group
from megatron_rl.validation import check_choice, check_range

__all__ = [
    "CRITIC_DIR",
    "CriticConfig",
    "CriticMicroBatch",
    "ValueHead",
    "ValueLossSettings",
    "build_critic",
    "critic_micro_batches",
    "critic_train_step",
    "forward_values",
    "load_critic_checkpoint",
    "load_hf_into_critic",
    "save_critic_checkpoint",
]

CRITIC_DIR = "critic"
"""The critic's distributed checkpoint inside a run checkpoint: ``checkpoints/step_XXXXXXXX/critic/``."""

OUTPUT_LAYER_PREFIX = "output_layer."
"""The value head's parameter names start with this (it replaces GPTModel's ``output_layer``)."""

DEFAULT_CRITIC_LR = 1e-5
"""verl's ``critic.optim.lr``."""

_METRICS = ("vf_loss", "vf_clip_frac", "vf_error", "value_mean")


@dataclass(frozen=True)
class CriticConfig:
    """The value model of PPO with a critic, used when ``algorithm.advantage='gae'`` (ignored otherwise).
    It has the policy's layout (``parallel``), layer spec and recompute settings (``model``) and starts
    from the same HF weights with a fresh value head (:mod:`megatron_rl.megatron.critic`)."""

    optim: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=DEFAULT_CRITIC_LR))
    """The critic's own AdamW (its own learning rate, betas, weight decay, gradient clip, distributed
    optimizer and bf16 switch; same fields as the top-level ``optim``). Default lr 1e-5 (verl's critic);
    ``optim.warmup_steps`` here is the critic's learning-rate warmup, not ``warmup_steps`` below."""

    warmup_steps: int = 0
    """Value pre-training: the first this many steps update only the critic (the policy and the rollout
    engine keep their weights), so that GAE starts from values that fit the returns. verl's
    ``trainer.critic_warmup=k`` skips the actor while ``global_steps < k``, i.e. in k - 1 steps; here k
    means k steps."""

    cliprange_value: float | None = 0.5
    """Clip of the value loss: a new value counts at most this far from the value at sampling time
    (``algorithms.value_loss``; verl's ``critic.cliprange_value``); null: the plain squared error."""

    loss_agg: str = "token-mean"
    """How the per-token value losses become one number (``algorithms.AGGREGATION_MODES``; verl's critic
    ``loss_agg_mode``, default token-mean)."""

    micro_batch_size: int = 4
    """Sequences per forward/backward pass of the critic (a memory knob; the critic's activations are
    those of the policy's trunk without the vocabulary-wide output layer)."""

    max_tokens_per_micro_batch: int = 0
    """Token-budget micro-batches for the critic (0: off, fixed micro_batch_size sequences); as
    ``algorithm.max_tokens_per_micro_batch``."""

    head_seed: int = 0
    """Seed of the value head's initial weights (the same on every rank and layout)."""

    def __post_init__(self) -> None:
        if not isinstance(self.optim, OptimizerSettings):
            raise ValueError(f"critic.optim={self.optim!r} must be an optimizer section (lr, beta1, ...)")
        check_range("critic.warmup_steps", self.warmup_steps, low=0, integer=True)
        if self.cliprange_value is not None:
            check_range("critic.cliprange_value", self.cliprange_value, low=0.0, low_inclusive=False)
        check_choice("critic.loss_agg", self.loss_agg, algorithms.AGGREGATION_MODES)
        check_range("critic.micro_batch_size", self.micro_batch_size, low=1, integer=True)
        check_range("critic.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, low=0, integer=True)
        check_range("critic.head_seed", self.head_seed, low=0, integer=True)

    def loss_settings(self) -> ValueLossSettings:
        """The settings of :func:`critic_train_step` this config asks for."""
        return ValueLossSettings(cliprange_value=self.cliprange_value, loss_agg=self.loss_agg)


@dataclass(frozen=True)
class ValueLossSettings:
    """The clipped value loss of :func:`critic_train_step` (``algorithms.value_loss``, aggregated)."""

    cliprange_value: float | None = 0.5
    """See :attr:`CriticConfig.cliprange_value`."""
    loss_agg: str = "token-mean"
    """See :attr:`CriticConfig.loss_agg`."""
    loss_agg_constant: float | None = None
    """The fixed length of 'seq-mean-token-sum-norm' (as :class:`~megatron_rl.megatron.train_step.LossSettings`);
    None: the widest micro-batch's T-1."""

    def __post_init__(self) -> None:
        if self.cliprange_value is not None:
            check_range("cliprange_value", self.cliprange_value, low=0.0, low_inclusive=False)
        check_choice("loss_agg", self.loss_agg, algorithms.AGGREGATION_MODES)
        if self.loss_agg_constant is not None:
            check_range("loss_agg_constant", self.loss_agg_constant, low=0.0, low_inclusive=False)


# ------------------------------------------------------------------ the model


class ValueHead(torch.nn.Linear):
    """``Linear(hidden, 1)`` with a bias: one value per position, replicated on every TP rank.

    Called like Megatron's output layer (``head(hidden, weight=None, runtime_gather_output=None)``) it
    returns ``(values (..., 1) in fp32, None)``. Its parameters carry no ``tensor_model_parallel``
    attribute, so Megatron counts them once (TP rank 0) in the gradient norm, as its norms'. Its input,
    the final hidden states, is the same on every TP rank and so are its gradients: no TP reduction."""

    def __init__(self, hidden_size: int, *, seed: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(hidden_size, 1, bias=True, device="cpu", dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.weight.copy_(torch.randn((1, hidden_size), generator=generator) / math.sqrt(hidden_size + 1))
            self.bias.zero_()
        self.to(device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None,  # type: ignore[override]
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        return super().forward(hidden).float(), None


def build_critic(hf_config: Any, *, head_seed: int = 0, **build_kwargs: Any) -> torch.nn.Module:
    """This rank's critic stage: :func:`~megatron_rl.megatron.model.build_gpt_model` with ``build_kwargs``
    (tp_size, pp_size, pre_process, post_process, params_dtype, layer_spec, recompute_*), the embedding
    untied, and on the last stage (``post_process``) the output layer replaced by a :class:`ValueHead`
    seeded with ``head_seed``. The trunk holds Megatron's random init until
    :func:`load_hf_into_critic` (or a checkpoint) fills it."""
    from megatron_rl.megatron.model import build_gpt_model

    model = build_gpt_model(hf_config, tie_embeddings=False, **build_kwargs)
    if model.post_process:  # the (vocab / tp, hidden) LM head is dropped (its memory freed) for the value head
        device = model.output_layer.weight.device
        model.output_layer = ValueHead(model.config.hidden_size, seed=head_seed, dtype=model.config.params_dtype,
                                       device=device)
    return model


def load_hf_into_critic(model: torch.nn.Module, hf_state: dict[str, torch.Tensor], hf_config: Any, *,
                        tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1) -> None:
    """Copy this rank's shard of the HF weights into the critic's trunk (every parameter but the value
    head, which keeps its init). The HF model's own ``lm_head`` (or its tied embedding) is not used for
    the head. Raises KeyError naming the parameters the HF map and the critic do not share."""
    from megatron_rl.checkpoint.qwen2 import OUTPUT_LAYER, hf_to_megatron_shard

    gpt = unwrap_ddp(model)
    params = {name: p for name, p in gpt.named_parameters() if not name.startswith(OUTPUT_LAYER_PREFIX)}
    shard = hf_to_megatron_shard(hf_state, hf_config, tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank,
                                 pp_size=pp_size, layer_spec=gpt.layer_spec)
    shard.pop(OUTPUT_LAYER[0], None)  # the LM head (or the last stage's copy of a tied embedding)
    missing, extra = sorted(set(params) - set(shard)), sorted(set(shard) - set(params))
    if missing or extra:
        raise KeyError(f"critic and HF map disagree: critic parameters the map does not fill: {missing or 'none'}; "
                       f"mapped names the critic lacks: {extra or 'none'}")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != shard[name].shape:
                raise ValueError(f"{name}: critic has shape {tuple(param.shape)}, converted {tuple(shard[name].shape)}")
            param.copy_(shard[name])


def _values(stage: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The last stage's final hidden states (T, b, h) -> values (b, T-1) in fp32, aligned with the
    targets ``input_ids[:, 1:]`` (position t: the state before token t + 1)."""
    values, _ = unwrap_ddp(stage).output_layer(hidden)  # (T, b, 1)
    return values.squeeze(-1).transpose(0, 1)[:, :-1]


# ------------------------------------------------------------------ forward (no grad)


@torch.no_grad()
def forward_values(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    mask: torch.Tensor,
    micro_batch_size: int | None = None,
    max_tokens_per_micro_batch: int = 0,
) -> torch.Tensor:
    """The critic's values at ``mask``'s positions, (B, T-1) fp32, 0 elsewhere, on every rank.

    Megatron's forward-only schedule over micro-batches (``micro_batch_size`` rows, default B; or
    token-budget micro-batches of at most ``max_tokens_per_micro_batch`` padded tokens, each cut to its
    longest row); the last stage applies the value head and broadcasts the values to the other stages.
    Every rank of a model replica calls this with the same arguments. ``input_ids`` (B, T) right-padded,
    ``mask`` (B, T-1) bool (the response tokens).
    """
    batch, seq = input_ids.shape
    if tuple(mask.shape) != (batch, seq - 1):
        raise ValueError(f"mask shape {tuple(mask.shape)} != (B, T-1) = {(batch, seq - 1)}")
    groups = forward_groups(mask, batch, seq, micro_batch_size=micro_batch_size,
                            max_tokens_per_micro_batch=max_tokens_per_micro_batch)
    device = _device()
    input_ids = input_ids.to(device)
    index = [torch.tensor(rows, device=device) for rows, _ in groups]
    micro_batches = [input_ids[rows, :width] for rows, (_, width) in zip(index, groups)]

    def forward_step(data_iterator, stage):
        ids = next(data_iterator)
        hidden = stage_forward(stage, ids)

        def collect(final_hidden: torch.Tensor):
            return final_hidden.new_zeros(()), {"values": _values(stage, final_hidden)}

        return hidden, collect

    outputs = run_schedule(model, forward_step, micro_batches, {tuple(ids.shape) for ids in micro_batches},
                           forward_only=True)
    pp_group = pipeline_parallel_group()
    pp_size = pp_group.size()
    values = torch.zeros((batch, seq - 1), dtype=torch.float32, device=device)
    if pp_group.rank() == pp_size - 1:
        for rows, (_, width), out in zip(index, groups, outputs, strict=True):
            values[rows, : width - 1] = out["values"]
    if pp_size > 1:
        dist.broadcast(values, src=dist.get_global_rank(pp_group, pp_size - 1), group=pp_group)
    return torch.where(mask.to(device, torch.bool), values, torch.zeros_like(values))


# ------------------------------------------------------------------ the update


@dataclasses.dataclass(frozen=True)
class CriticMicroBatch:
    """One micro-batch of the critic's update; every (b, T-1) tensor is aligned with ``input_ids[:, 1:]``."""

    input_ids: torch.Tensor  # (b, T)
    response_mask: torch.Tensor  # (b, T-1) bool: the tokens of the loss
    old_values: torch.Tensor  # (b, T-1) the critic's values when the advantages were computed
    returns: torch.Tensor  # (b, T-1) the targets (GAE returns)

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        for name in ("response_mask", "old_values", "returns"):
            if tuple(getattr(self, name).shape) != (b, t - 1):
                shape = tuple(getattr(self, name).shape)
                raise ValueError(f"{name} has shape {shape}; expected (b, T-1) = {(b, t - 1)}")


def critic_micro_batches(
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    *,
    loss_mask: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    micro_batch_size: int,
    max_tokens_per_micro_batch: int = 0,
) -> list[CriticMicroBatch]:
    """The critic's micro-batches of the rows ``rows`` (a mini-batch) of a step's (N, T) ``input_ids``
    and (N, T-1) ``loss_mask`` / ``old_values`` / ``returns``: ``micro_batch_size`` rows each at the full
    width, or (``max_tokens_per_micro_batch`` > 0) rows grouped by length and cut to their longest row,
    as :func:`~megatron_rl.trainer.batch.make_micro_batches` groups the policy's."""
    groups, widths = split_rows(rows, loss_mask, micro_batch_size=micro_batch_size,
                                max_tokens_per_micro_batch=max_tokens_per_micro_batch, field="critic.micro_batch_size")
    return [CriticMicroBatch(input_ids[chunk, :width], loss_mask[chunk, : width - 1], old_values[chunk, : width - 1],
                             returns[chunk, : width - 1]) for chunk, width in zip(groups, widths, strict=True)]


def critic_train_step(
    model: torch.nn.Module,
    optimizer: Any,
    micro_batches: Sequence[CriticMicroBatch],
    *,
    global_num_tokens: int,
    global_num_seqs: int | None = None,
    settings: ValueLossSettings = ValueLossSettings(),
) -> dict[str, float]:
    """Forward + backward of the clipped value loss over ``micro_batches`` (1F1B when PP > 1), then one
    optimizer step (skipped everywhere when the loss or a gradient is not finite).

    Args:
        model: this rank's critic stage wrapped by :func:`~megatron_rl.megatron.optim.wrap_ddp`.
        optimizer: from :func:`~megatron_rl.megatron.optim.build_optimizer` over it.
        micro_batches: this DP rank's micro-batches (shapes may differ); every TP/PP rank of a replica
            passes the same ones.
        global_num_tokens: valid tokens over all micro-batches and DP ranks
            (:func:`~megatron_rl.megatron.train_step.count_valid_tokens` accepts these micro-batches).
        global_num_seqs: valid sequences likewise; needed by the seq-mean ``loss_agg`` modes.

    Returns:
        Python floats, the same on every rank: ``vf_loss`` (the aggregated clipped loss, 0.5 x squared
        error), ``vf_clip_frac`` (tokens whose clipped error is the larger), ``vf_error`` (token mean of
        the unclipped squared error), ``value_mean`` (token mean of the values), ``grad_norm`` (before
        clipping; nan when skipped) and ``update_successful`` (1.0 or 0.0).
    """
    from megatron_rl.megatron.train_step import schedule_and_step

    if not micro_batches:
        raise ValueError("micro_batches is empty")
    shapes = {tuple(mb.input_ids.shape) for mb in micro_batches}
    agg_constant = settings.loss_agg_constant or max(seq for _, seq in shapes) - 1
    dp_group, pp_group = data_parallel_group(), pipeline_parallel_group()
    loss_multiplier = len(micro_batches) * dp_group.size()  # undone by the schedule and the DDP average
    device = _device()

    def forward_step(data_iterator, stage):
        mb: CriticMicroBatch = next(data_iterator)
        mask = mb.response_mask.to(device)
        output = stage_forward(stage, mb.input_ids.to(device))

        def loss_func(hidden: torch.Tensor):
            values = _values(stage, hidden)  # (b, T-1)
            token_loss, metrics = algorithms.value_loss(values, mb.old_values.to(device), mb.returns.to(device), mask,
                                                        clip_range=settings.cliprange_value,
                                                        global_num_tokens=global_num_tokens)
            loss = algorithms.aggregate(token_loss, mask, settings.loss_agg, global_num_tokens=global_num_tokens,
                                        global_num_seqs=global_num_seqs, constant=agg_constant)
            value_mean = algorithms.aggregate(values.detach(), mask, "token-mean", global_num_tokens=global_num_tokens)
            reported = {"vf_loss": loss.detach(), "value_mean": value_mean, **metrics}
            return loss * loss_multiplier, reported

        return output, loss_func

    return schedule_and_step(forward_step, micro_batches, _METRICS, loss_name="vf_loss", model=model,
                             optimizer=optimizer, pp_group=pp_group, dp_group=dp_group)


# ------------------------------------------------------------------ checkpoint


def save_critic_checkpoint(run_checkpoint_dir: str | Path, model: torch.nn.Module, optimizer: Any, *,
                           iteration: int) -> Path:
    """Save the critic (model + optimizer) into ``run_checkpoint_dir``/:data:`CRITIC_DIR` (created).
    Collective. The RNG state stored with it is the policy checkpoint's (saved at the same moment);
    :func:`load_critic_checkpoint` does not restore it."""
    from megatron_rl.checkpoint.distributed import save_checkpoint

    path = Path(run_checkpoint_dir) / CRITIC_DIR
    save_checkpoint(path, model, optimizer, iteration=iteration)
    return path


def load_critic_checkpoint(run_checkpoint_dir: str | Path, model: torch.nn.Module, optimizer: Any) -> int:
    """Load ``run_checkpoint_dir``/:data:`CRITIC_DIR` into the critic and its optimizer (any layout;
    the RNG state is left to the policy's checkpoint). Returns the saved iteration. Collective.

    Raises:
        FileNotFoundError: the run checkpoint holds no critic (saved by a run without one).
    """
    from megatron_rl.checkpoint.distributed import load_checkpoint

    path = Path(run_checkpoint_dir) / CRITIC_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{run_checkpoint_dir} holds no critic checkpoint ({CRITIC_DIR}/): it was saved by a "
                                "run without a critic (algorithm.advantage other than 'gae')")
    return load_checkpoint(path, model, optimizer, load_rng=False)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
