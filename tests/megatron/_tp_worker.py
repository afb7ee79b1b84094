"""One rank of the multi-process tests, launched like torchrun would (env:// variables set):

    python _tp_worker.py OUT_DIR LAYOUTS MODEL_DIR [MODEL_DIR ...]

LAYOUTS is a comma-separated list of TPxPP (e.g. ``2x1,1x2``). For each layout (one process group,
Megatron's groups rebuilt per layout) and each model, saves this rank's ParallelInfo, logprobs,
entropy and (at PP=1) the gradients of :func:`_helpers.megatron_logprob_grads` to
OUT_DIR/rank{RANK}.pt as ``{(layout, model_dir): {...}}``. One launch for all cases keeps the test
fast: most of a worker's time is importing megatron and transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out_dir: str, layouts: str, model_dirs: list[str]) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _helpers import megatron_logprob_grads, megatron_logprobs

    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel

    results = {}
    try:
        for layout in layouts.split(","):
            tp, pp = (int(n) for n in layout.split("x"))
            info = init_parallel(tp=tp, pp=pp)
            for model_dir in model_dirs:
                logprobs, entropy = megatron_logprobs(model_dir, info)
                results[(layout, model_dir)] = {"info": info, "logprobs": logprobs, "entropy": entropy}
                if pp == 1:
                    results[(layout, model_dir)]["grads"] = megatron_logprob_grads(model_dir, info)
        torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
