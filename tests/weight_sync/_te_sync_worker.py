"""One rank of the weight-sync tests with Transformer Engine names (2 ranks), launched like torchrun would:

    python _te_sync_worker.py OUT_DIR LAYOUTS MODEL_DIR

Per layout (TPxPP, e.g. ``2x1,1x2``): builds this rank's stage, presents it under TE names (the CPU
stand-in of tests/checkpoint/_te_standin.py), loads MODEL_DIR's HF weights through those names
(``load_hf_into_model``), pushes them with :class:`WeightSync` into a :class:`RecordingEngine` on the
feeding rank, runs ``check``, then changes one TE-named norm weight and keeps ``check``'s error. Saves
``{layout: {...}}`` to OUT_DIR/rank{RANK}.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BUCKET_BYTES = 100_000


class RecordingEngine:
    """Records what a weight sync hands to ``load_weights`` (copies: the sync reuses its buffers) and gives
    it back through ``engine_weights`` (with the tied LM head, as vLLM reports it)."""

    def __init__(self, tied: bool) -> None:
        self.tied = tied
        self.weights: dict[str, torch.Tensor] = {}
        self.calls: list[list[str]] = []

    def load_weights(self, bucket) -> None:
        self.calls.append([name for name, _ in bucket])
        for name, tensor in bucket:
            self.weights[name] = tensor.detach().clone()

    def engine_weights(self) -> dict[str, torch.Tensor]:
        out = dict(self.weights)
        if self.tied:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out


def check_error(sync, engine) -> str:
    try:
        sync.check(engine)
    except ValueError as err:
        return str(err)
    return ""


def run_layout(layout: str, model_dir: str) -> dict:
    from _te_standin import present_under_te_names
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import init_parallel
    from megatron_rl.weight_sync import WeightSync

    tp, pp = (int(n) for n in layout.split("x"))
    info = init_parallel(tp=tp, pp=pp)
    config = AutoConfig.from_pretrained(model_dir)
    model = present_under_te_names(build_gpt_model(config, tp_size=tp, pp_size=pp, pre_process=info.pp_rank == 0,
                                                   post_process=info.pp_rank == pp - 1))
    load_hf_into_model(model, load_file(str(Path(model_dir) / "model.safetensors")), config, tp_rank=info.tp_rank,
                       tp_size=tp, pp_rank=info.pp_rank, pp_size=pp)
    feeds = info.tp_rank == 0 and info.pp_rank == 0
    engine = RecordingEngine(config.tie_word_embeddings) if feeds else None
    sync = WeightSync(model, config, bucket_bytes=BUCKET_BYTES, dtype=torch.float32)
    stats = sync.push(engine)
    sync.check(engine)
    names = sorted(n for n, _ in model.named_parameters())
    with torch.no_grad():  # the first layer norm of this stage, under its TE name
        model.get_parameter("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")[0] += 0.5
    return {"info": info, "names": names, "stats": stats, "shared_memory": sync.shared_memory,
            "weights": engine.weights if feeds else None, "calls": engine.calls if feeds else None,
            "changed_error": check_error(sync, engine)}


def main(out_dir: str, layouts: str, model_dir: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))
    from megatron_rl.megatron.parallel import destroy_parallel

    results = {layout: run_layout(layout, model_dir) for layout in layouts.split(",")}
    torch.save(results, Path(out_dir) / f"rank{results[layouts.split(',')[0]]['info'].rank}.pt")
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
