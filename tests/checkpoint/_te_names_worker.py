"""One rank of a PP=2 world (2 ranks), launched like torchrun would:

    python _te_names_worker.py OUT_DIR NAME=HF_DIR [NAME=HF_DIR ...]

Builds this rank's pipeline stage of each model (local spec) and saves, per model, its parameter names and
the key each one has in the stage's ``sharded_state_dict()`` (where Megatron applies the local spec's
``sharded_state_dict_keys_map``) to OUT_DIR/rank{RANK}.pt. A real PP=2 world is needed: Megatron builds
the last stage of a tied model only where it is not also the first."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out_dir: str, *models: str) -> None:
    torch.set_num_threads(1)
    from transformers import AutoConfig

    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel

    info = init_parallel(tp=1, pp=2)
    results = {}
    for item in models:
        name, path = item.split("=", 1)
        model = build_gpt_model(AutoConfig.from_pretrained(path), pp_size=2, pre_process=info.pp_rank == 0,
                                post_process=info.pp_rank == 1)
        sharded = model.sharded_state_dict()
        results[name] = {"pp_rank": info.pp_rank, "names": [n for n, _ in model.named_parameters()],
                         "keys": {n: sharded[n].key for n, _ in model.named_parameters()}}
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
