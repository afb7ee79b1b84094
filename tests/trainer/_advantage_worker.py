"""One rank of the data-parallel advantage test (gloo, env:// variables set):

    python _advantage_worker.py OUT_DIR

Rank r takes rows 2r, 2r+1 of test_step_advantages.small_batch() and computes GAE advantages with KL in
the reward and an adaptive controller over the two-rank group; saves OUT_DIR/rank{r}.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def one_process(group, rows: slice = slice(None)) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_step_advantages import small_batch

    from megatron_rl.trainer.advantage import step_advantages
    from megatron_rl.trainer.batch import RolloutBatch
    from megatron_rl.trainer.config import AlgorithmConfig

    full = small_batch()
    batch = RolloutBatch(**{name: getattr(full, name)[rows] for name in full.__dataclass_fields__})
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(4, 4, generator=generator)[rows] * batch.response_mask
    ref = -torch.rand(4, 4, generator=generator)[rows] * batch.response_mask
    alg = AlgorithmConfig(advantage="gae", gamma=0.95, lam=0.9, kl_in_reward=True, kl_controller="adaptive",
                          kl_reward_coef=0.1, kl_target=0.05, kl_horizon=50.0)
    controller = alg.make_kl_controller()
    result = step_advantages(alg, batch, values=values, old_logprobs=torch.zeros_like(ref), ref_logprobs=ref,
                             kl_controller=controller, dp_group=group)
    return {"advantages": result.token_advantages, "coef": controller.value, "metrics": result.metrics}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        result = one_process(dist.group.WORLD, slice(2 * rank, 2 * rank + 2))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
