"""One rank of the weight-sync tests, launched like torchrun would (env:// variables set):

    python _sync_worker.py OUT_DIR LAYOUTS MODEL_DIR

MODEL_DIR is the checkpoint the vLLM engine starts from (its weights are NOT the trainer's). The
trainer's Megatron model gets its own random weights (:func:`fill`), so a sync is needed before the
engine matches. Per layout (TPxPP, e.g. ``1x1,2x1,1x2``; DP is what the world size leaves), on one
engine per process (created once, after the gloo group, as DESIGN.md prescribes): check fails before
the push, push, check passes; greedy and sampled rollouts with the engine's weights and Megatron's
logprobs of the sampled tokens; then perturb the trainer's weights, push again, and the same again.
At TP > 1 a second sync that gathers through gloo instead of shared memory pushes once more. Rank 0's
engine multiplies by plain weights (``cpu_gemm="plain"``), the others' by vLLM's packed copies.
Saves ``{layout: {...}}`` to OUT_DIR/rank{RANK}.pt."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch

PROMPTS = [[317, 282, 643, 520, 830, 30, 198], [56, 78, 84, 264], [100, 200, 300, 400, 500, 600, 700, 800, 900]]
TEMPERATURE = 0.7
BUCKET_BYTES = 100_000  # < the embedding and each gate/up pair of the tiny model: those go alone


@torch.no_grad()
def fill(model: torch.nn.Module, hf_config, pp_rank: int, pp_size: int, tp_rank: int, seed: int, scale: float,
         add: bool) -> None:
    """Set (or, with ``add``, perturb) every parameter with noise keyed by its HF names and TP rank, so that
    TP ranks agree on replicated tensors and the tied copy of the embedding equals the embedding. Spread
    like tests/megatron/_helpers.spread_weights: linear std 1/sqrt(fan_in), embedding 0.3, norms
    1 + 0.1 N(0,1), biases 0.1 N(0,1) (times ``scale``)."""
    import zlib

    from megatron_rl.checkpoint.qwen2 import REPLICATED, _stage_names
    from megatron_rl.megatron.model import GPTShape

    names = _stage_names(GPTShape.from_hf(hf_config), pp_rank, pp_size)
    for name, param in model.named_parameters():
        hf_names, kind = names[name]
        key = f"{seed}/{','.join(hf_names)}/{0 if kind == REPLICATED else tp_rank}"
        noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
        if "norm" in name:
            value = (0.0 if add else 1.0) + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif "embedding" in name or "output_layer" in name:
            value = 0.3 * noise
        else:
            value = noise / param.shape[1] ** 0.5
        param.copy_(param + scale * value if add else scale * value)


def share(tensor: torch.Tensor | None, info, shape_len: int = 2) -> torch.Tensor:
    """Broadcast a (B, T) int64 tensor from the feeding rank to the rest of its replica (world = one
    replica whenever tp * pp > 1 in these tests)."""
    import torch.distributed as dist

    if info.tp_size * info.pp_size == 1:
        return tensor
    shape = torch.tensor(tensor.shape if tensor is not None else [0] * shape_len)
    dist.broadcast(shape, src=0)
    if tensor is None:
        tensor = torch.empty(tuple(shape.tolist()), dtype=torch.int64)
    dist.broadcast(tensor, src=0)
    return tensor


def rollouts_and_logprobs(model, engine, info, vocab_size: int) -> dict:
    """Greedy and sampled rollouts (feeding rank) and Megatron's logprobs of the sampled tokens (every rank)."""
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.rollout import SamplingConfig

    out = {}
    ids = None
    if engine is not None:
        greedy = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=12))
        sampled = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=8, seed=3))
        out["greedy"] = [r.token_ids for r in greedy]
        out["sampled"] = [(r.prompt_index, r.token_ids, r.logprobs) for r in sampled]
        seqs = [PROMPTS[r.prompt_index] + list(r.token_ids) for r in sampled]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # right padding: causal, never attended
    ids = share(ids, info)
    out["megatron_logprobs"] = forward_logprobs(model, ids, vocab_size=vocab_size, temperature=TEMPERATURE).logprobs
    return out


def check_fails(sync, engine) -> str:
    try:
        sync.check(engine)
    except ValueError as err:
        return str(err)
    return ""


def run_layout(layout: str, model_dir: str, engine) -> dict:
    from transformers import AutoConfig

    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.optim import OptimizerSettings, unwrap_ddp, wrap_ddp
    from megatron_rl.megatron.parallel import init_parallel
    from megatron_rl.weight_sync import WeightSync

    tp, pp = (int(n) for n in layout.split("x"))
    info = init_parallel(tp=tp, pp=pp)
    hf_config = AutoConfig.from_pretrained(model_dir)
    model = build_gpt_model(hf_config, tp_size=tp, pp_size=pp, pre_process=info.pp_rank == 0,
                            post_process=info.pp_rank == pp - 1)
    fill(model, hf_config, info.pp_rank, pp, info.tp_rank, seed=0, scale=1.0, add=False)
    if layout == "1x1":
        model = wrap_ddp(model, OptimizerSettings())  # the sync takes the DDP-wrapped model too
    feeds = info.tp_rank == 0 and info.pp_rank == 0
    engine = engine if feeds else None
    sync = WeightSync(model, hf_config, bucket_bytes=BUCKET_BYTES, dtype=torch.float32)
    result = {"info": info, "before_push_error": check_fails(sync, engine),
              "plain_cpu_gemms": engine.plain_cpu_gemms if feeds else None}
    result["stats"] = sync.push(engine)
    sync.check(engine)
    result["engine_weights"] = engine.engine_weights() if feeds else None
    result["params"] = {n: p.detach().clone() for n, p in unwrap_ddp(model).named_parameters()}
    result["first"] = rollouts_and_logprobs(unwrap_ddp(model), engine, info, hf_config.vocab_size)

    fill(unwrap_ddp(model), hf_config, info.pp_rank, pp, info.tp_rank, seed=1, scale=0.2, add=True)
    result["stale_error"] = check_fails(sync, engine)
    result["stats2"] = sync.push(engine)
    sync.check(engine)
    result["engine_weights2"] = engine.engine_weights() if feeds else None
    result["second"] = rollouts_and_logprobs(unwrap_ddp(model), engine, info, hf_config.vocab_size)
    result["buckets"] = [[name for name, _ in bucket] for bucket in sync.buckets()]
    result["shared_memory"] = sync.shared_memory
    if tp > 1:  # the gather through the process group (used with CUDA or across hosts)
        fallback = WeightSync(model, hf_config, bucket_bytes=BUCKET_BYTES, dtype=torch.float32, shared_memory=False)
        fill(unwrap_ddp(model), hf_config, info.pp_rank, pp, info.tp_rank, seed=2, scale=0.2, add=True)
        result["fallback_stale_error"] = check_fails(fallback, engine)
        fallback.push(engine)
        fallback.check(engine)
        assert not fallback.shared_memory
    if feeds:  # one wrong tensor inside a fused group: check must name it
        weights = engine.engine_weights()
        family = [f"model.layers.1.self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")]
        weights["model.layers.1.self_attn.k_proj.bias"][3] += 1e-3
        engine.load_weights([(name, weights[name]) for name in family])
    result["corrupt_error"] = check_fails(sync, engine)
    return result


def main(out_dir: str, layouts: str, model_dir: str) -> None:
    set_num_threads = torch.set_num_threads
    set_num_threads(1)
    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel
    from megatron_rl.rollout.vllm_engine import VLLMEngine

    first = layouts.split(",")[0]
    info = init_parallel(*(int(n) for n in first.split("x")))  # the gloo group first, then vLLM
    engine = VLLMEngine(model_dir, max_model_len=256, kv_cache_memory_bytes=64 << 20, seed=0,
                        cpu_gemm="plain" if info.rank == 0 else "packed")
    results = {layout: run_layout(layout, model_dir, engine) for layout in layouts.split(",")}
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
