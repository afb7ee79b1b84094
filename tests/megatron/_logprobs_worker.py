"""One rank of the TP=2 check of the chunked output layer (plain gloo, no Megatron), launched like
torchrun would (env:// variables set):

    python _logprobs_worker.py OUT_DIR

Each rank holds its half of the rows of :func:`output_case`'s padded output weight and computes
:func:`megatron_rl.megatron.logprobs.output_layer_logprobs` with the two ranks as the TP group, for each
vocabulary size of VOCAB_SIZES and chunk size of CHUNK_SIZES, then the gradients of :func:`case_loss`
(or of the logprob term alone), in fp32 and in fp64. Saves ``{(vocab_size, chunk_size, with_entropy,
dtype): {...}}`` to OUT_DIR/rank{RANK}.pt. The test compares them with the TP=1 computation from the full
logits."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

PADDED_VOCAB = 48  # 24 rows per rank at TP=2
VOCAB_SIZES = (37, 20)  # rank 1 holds 13 real rows and 11 padding rows; or padding only
CHUNK_SIZES = (0, 1, 4)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def output_case(vocab_size: int, *, dtype: torch.dtype = torch.float32, seq: int = 11, batch: int = 3,
                hidden: int = 32, seed: int = 0) -> dict:
    """Final hidden states (T, b, h) ~ N(0, 1) (what the final RMSNorm gives), an output weight (48, h)
    ~ N(0, 1/h) (logits of standard deviation ~1), token ids, a response mask that starts after a prompt
    of a different length per row (20 positions), and per-position loss coefficients ~ N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, seq - 1, dtype=torch.bool)
    for row, (start, end) in enumerate(((2, 9), (5, 10), (0, 4))):
        mask[row, start:end] = True
    case = {
        "hidden": torch.randn(seq, batch, hidden, generator=generator),
        "weight": torch.randn(PADDED_VOCAB, hidden, generator=generator) / hidden**0.5,
        "ids": torch.randint(0, vocab_size, (batch, seq), generator=generator),
        "mask": mask,
        "logprob_coef": torch.randn(batch, seq - 1, generator=generator),
        "entropy_coef": torch.randn(batch, seq - 1, generator=generator),
    }
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in case.items()}


def case_loss(case: dict, logprobs: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
    """The token mean (as the train step's loss) of c_l * logprobs (+ c_e * entropy) over the masked positions."""
    loss = (case["logprob_coef"] * logprobs * case["mask"]).sum()
    if entropy is not None:
        loss = loss + (case["entropy_coef"] * entropy * case["mask"]).sum()
    return loss / case["mask"].sum()


def main(out_dir: str) -> None:
    import torch.distributed as dist

    from megatron_rl.megatron.logprobs import output_layer_logprobs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = PADDED_VOCAB // world
    results = {}
    try:
        for (vocab_size, dtype_name) in ((v, d) for v in VOCAB_SIZES for d in DTYPES):
            case = output_case(vocab_size, dtype=DTYPES[dtype_name])
            for chunk_size in CHUNK_SIZES:
                for with_entropy in (True, False):
                    hidden = case["hidden"].clone().requires_grad_()
                    weight = case["weight"][rank * rows : (rank + 1) * rows].clone().requires_grad_()
                    result = output_layer_logprobs(hidden, weight, case["ids"], vocab_size=vocab_size,
                                                   temperature=0.7, tp_group=dist.group.WORLD,
                                                   with_entropy=with_entropy, mask=case["mask"],
                                                   chunk_size=chunk_size)
                    case_loss(case, result.logprobs, result.entropy).backward()
                    results[(vocab_size, chunk_size, with_entropy, dtype_name)] = {
                        "logprobs": result.logprobs.detach(),
                        "entropy": None if result.entropy is None else result.entropy.detach(),
                        "hidden_grad": hidden.grad, "weight_grad": weight.grad}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1])
