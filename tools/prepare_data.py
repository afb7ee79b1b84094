#!/usr/bin/env python3
"""Prepare benchmark files for training: the same as `megatron-rl prepare-data`.

    python tools/prepare_data.py --input raw/mediq.json --output-dir data/ [--do-normal]
"""

import sys

from megatron_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare-data", *sys.argv[1:]]))
