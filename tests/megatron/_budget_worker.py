"""One rank of the PP=2 token-budget check, launched like torchrun would (env:// variables set):

    python _budget_worker.py OUT_DIR MODEL_DIR MAX_TOKENS

Runs :func:`_helpers.token_budget_step` at TP=1 x PP=2 with token-budget micro-batches (different
shapes per micro-batch: the schedule sends each activation's shape first) and saves this rank's
ParallelInfo and results to OUT_DIR/rank{RANK}.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out_dir: str, model_dir: str, max_tokens: int) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _helpers import token_budget_step

    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel

    try:
        info = init_parallel(tp=1, pp=2)
        result = token_budget_step(model_dir, info, max_tokens_per_micro_batch=max_tokens)
        torch.save({"info": info, **result}, Path(out_dir) / f"rank{info.rank}.pt")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
