"""One rank of the DP=2 memory test (gloo), launched like torchrun would:

    python _bytes_worker.py OUT_DIR MODELS_DIR

For each shape in tests/memory/_measure.py and each optimizer (replicated, distributed) builds the policy
as the trainer does, runs one train step (Adam's state is created in it) and saves this rank's measured
params / grads / optimizer bytes to OUT_DIR/rank{RANK}.pt as ``{"shape/distributed": {...}}``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out_dir: str, models_dir: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import SHAPES, build, measured_state, micro_batches, run_config, step

    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel
    from megatron_rl.memory import hf_config_for

    info = init_parallel(tp=1, pp=1)
    results = {}
    try:
        for shape in SHAPES:
            for distributed in (False, True):
                cfg = run_config(Path(models_dir) / shape, micro=1, distributed=distributed)
                hf_config = hf_config_for(cfg)
                policy, optimizer = build(cfg, hf_config)
                step(policy, optimizer, cfg, hf_config, micro_batches(cfg, hf_config, rows=1, seed=info.rank))
                results[f"{shape}/{distributed}"] = measured_state(policy, optimizer)
                del policy, optimizer
        torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
