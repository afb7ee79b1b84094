#!/usr/bin/env python3
"""Score model responses with the medical rewards: the same as `megatron-rl score`.

    python tools/score.py FILE.parquet --responses FILE.jsonl [reward.k=v ...]
"""

import sys

from megatron_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
