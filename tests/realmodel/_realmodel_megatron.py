"""Worker process: Megatron (TP=1, CPU, fp32) logprobs of token sequences under the real model's weights.

    python _realmodel_megatron.py MODEL_DIR IN.json OUT.json

IN.json: {"sequences": [[ids...], ...], "temperature": T}. OUT.json: {"logprobs": [[lp of token 1..L-1], ...]}.
A process of its own: Megatron's parallel state and the test process's vLLM engine never meet.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main(model_dir: str, in_file: str, out_file: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel, local_world_env

    request = json.loads(open(in_file).read())
    os.environ.update(local_world_env())
    init_parallel(tp=1, pp=1)
    try:
        hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        model = build_gpt_model(hf_config, layer_spec="local")
        load_hf_into_model(model, load_file(os.path.join(model_dir, "model.safetensors")), hf_config, tp_rank=0,
                           tp_size=1)
        model.eval()
        out = []
        for sequence in request["sequences"]:  # one at a time: no padding
            ids = torch.tensor([sequence])
            logprobs = forward_logprobs(model, ids, vocab_size=hf_config.vocab_size,
                                        temperature=request["temperature"], micro_batch_size=1).logprobs
            out.append(logprobs[0].tolist())
    finally:
        destroy_parallel()
    with open(out_file, "w") as handle:
        json.dump({"logprobs": out}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])
