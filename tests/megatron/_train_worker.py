"""One rank of the multi-process training tests, launched like torchrun would (env:// variables set):

    python _train_worker.py OUT_DIR LAYOUTS MODEL_DIR NUM_STEPS

LAYOUTS is a comma-separated list of TPxPP (e.g. ``2x1,1x2,1x1``; DP is what the world size leaves,
and DP > 1 uses the distributed optimizer). For each layout runs :func:`_helpers.run_training` and saves
this rank's ParallelInfo and results to OUT_DIR/rank{RANK}.pt as ``{layout: {...}}``. The TP=2 and the
DP=2 runs also save a distributed checkpoint after their first step (OUT_DIR/ckpt_2x1, OUT_DIR/ckpt_1x1),
which is then resumed for one step: ckpt_2x1 at TP=2 (``"resume-2x1"``) and at PP=2 (``"resume-1x2"``),
ckpt_1x1 at DP=2 with the distributed optimizer (``"resume-1x1"``); only when LAYOUTS has 2x1 and 1x1."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out_dir: str, layouts: str, model_dir: str, num_steps: int) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _helpers import run_training

    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel

    results = {}
    try:
        for layout in layouts.split(","):
            tp, pp = (int(n) for n in layout.split("x"))
            info = init_parallel(tp=tp, pp=pp)
            save_to = Path(out_dir) / f"ckpt_{layout}" if layout in ("2x1", "1x1") else None
            result = run_training(model_dir, info, num_steps=num_steps, use_distributed_optimizer=info.dp_size > 1,
                                  save_to=save_to, save_after=1)
            results[layout] = {"info": info, **result}
        resumes = (("2x1", "2x1"), ("1x2", "2x1"), ("1x1", "1x1")) if {"2x1", "1x1"} <= set(results) else ()
        for layout, saved in resumes:
            tp, pp = (int(n) for n in layout.split("x"))
            info = init_parallel(tp=tp, pp=pp)
            result = run_training(model_dir, info, num_steps=1, use_distributed_optimizer=info.dp_size > 1,
                                  load_from=Path(out_dir) / f"ckpt_{saved}")
            results[f"resume-{layout}"] = {"info": info, **result}
        torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
