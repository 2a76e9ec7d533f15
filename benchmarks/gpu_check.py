"""The GPU check: `PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src python3
benchmarks/gpu_check.py --out gpu-check.jsonl` (within its default budget of 9 minutes; parts that
would not fit are skipped and say so).

The same as `zotune bench gpu`, for a machine where zotune is not installed (its own torch,
transformers and accelerate; nothing to install). Each part runs in its own process under a watchdog
and appends one JSON line to --out the moment it ends; exit code 0 all good, 1 a bitwise check
failed, 2 a part errored, timed out or was skipped. See src/zotune/bench/gpu.py for the parts.
"""

import sys

from zotune.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
