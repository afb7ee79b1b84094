"""One rank of the multi-process converter tests (4 ranks), launched like torchrun would:

    python _convert_worker.py OUT_DIR TIED_DIR UNTIED_DIR KV1_DIR

Expects OUT_DIR/conv_tied_1x1, OUT_DIR/conv_untied_2x1 and OUT_DIR/conv_kv1_2x1 (converted by the test).
Then:

1. TP=2 (DP=2): builds each model, loads its converted checkpoint (model only; the tied one was laid out
   for TP=1, so this also reshards; the KV1 model has one KV head, split over both TP ranks), and keeps
   the full logits of :func:`_helpers.fixed_batch` (vocab-parallel logits gathered over TP, padding cut).
2. TP=2 x PP=2: loads the untied HF weights (``load_hf_into_model``) and saves them with Megatron itself,
   model only (OUT_DIR/mcore_untied_2x2), to compare with the converter's layout; then trains the tied
   model one step with Adam and saves model + optimizer + RNG (OUT_DIR/train_tied_2x2).

Saves this rank's results to OUT_DIR/rank{RANK}.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def tp2_logits(ckpt_dir: Path, model_dir: str, info) -> torch.Tensor:
    import torch.distributed as dist
    from _helpers import fixed_batch
    from transformers import AutoConfig

    from megatron_rl.checkpoint.distributed import load_checkpoint
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import tensor_parallel_group

    config = AutoConfig.from_pretrained(model_dir)
    model = build_gpt_model(config, tp_size=info.tp_size)
    assert load_checkpoint(ckpt_dir, model) == 0
    model.eval()
    ids = fixed_batch(config.vocab_size)
    with torch.no_grad():
        local = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    parts = [torch.empty_like(local) for _ in range(info.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=tensor_parallel_group())
    return torch.cat(parts, dim=-1)[..., : config.vocab_size]


def main(out_dir: str, tied_dir: str, untied_dir: str, kv1_dir: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "megatron"))
    from _helpers import load_hf_state, run_training
    from transformers import AutoConfig

    from megatron_rl.checkpoint.distributed import save_checkpoint
    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel

    out = Path(out_dir)
    results = {}
    try:
        info = init_parallel(tp=2, pp=1)
        results["logits_tied"] = tp2_logits(out / "conv_tied_1x1", tied_dir, info)
        results["logits_untied"] = tp2_logits(out / "conv_untied_2x1", untied_dir, info)
        results["logits_kv1"] = tp2_logits(out / "conv_kv1_2x1", kv1_dir, info)

        info = init_parallel(tp=2, pp=2)
        config = AutoConfig.from_pretrained(untied_dir)
        first, last = info.pp_rank == 0, info.pp_rank == info.pp_size - 1
        model = build_gpt_model(config, tp_size=2, pp_size=2, pre_process=first, post_process=last)
        load_hf_into_model(model, load_hf_state(untied_dir), config, tp_rank=info.tp_rank, tp_size=2,
                           pp_rank=info.pp_rank, pp_size=2)
        save_checkpoint(out / "mcore_untied_2x2", model, None, iteration=0)
        trained = run_training(tied_dir, info, num_steps=1, save_to=out / "train_tied_2x2", save_after=1)
        results["info"], results["params"] = info, trained["params"]
        torch.save(results, out / f"rank{info.rank}.pt")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:5])
