#!/usr/bin/env python3
"""Evaluate an HF model on benchmark parquet files: the same as `megatron-rl eval`.

    python tools/eval.py --model HF_DIR --data FILE [FILE ...] --output-dir OUT [--n K] [--budgets 512,1024]
"""

import sys

from megatron_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
