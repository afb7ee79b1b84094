#!/usr/bin/env python3
"""Convert between Hugging Face and Megatron checkpoints: the same as `megatron-rl convert`.

    python tools/convert_checkpoint.py hf-to-megatron HF_DIR OUT_DIR --tp 2 --pp 2 [--dtype bf16] [--verify]
    python tools/convert_checkpoint.py megatron-to-hf CKPT_DIR OUT_DIR [--hf-config-from HF_DIR] [--verify]
"""

import sys

from megatron_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
