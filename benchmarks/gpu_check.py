"""The GPU check: `PYTHONPATH=src python benchmarks/gpu_check.py [--quick] [--device cuda:0]`.

The same as `zotune bench gpu`, for a machine where zotune is not installed (its own torch,
transformers and accelerate; nothing to install). Prints one JSON object; exit code 0 when the
bitwise checks pass. See src/zotune/bench/gpu.py for what it checks and measures.
"""

import sys

from zotune.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
