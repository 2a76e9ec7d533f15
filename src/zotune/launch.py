"""`zotune launch [torchrun options] COMMAND ...`: torchrun, with zotune's own exit codes and errors.

torchrun reports a worker that exits non-zero with a traceback of its own and a failure report of
about 40 lines, under the one line each rank printed, and exits 1 whatever the worker said. Here the
same launcher runs (`torch.distributed.run`, in this process), its agent's logs are kept to errors
of its own, and a failed run ends with the ranks' own lines and the exit code of the first rank that
failed: 2 for a refused input, 1 for a failed run, 130 for Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import sys

VERBS = ("train", "resume", "eval", "export", "replay", "compare")


def launch(argv: list[str]) -> int:
    """Run `torchrun [its options] -m zotune COMMAND ...` for `argv` = [its options..., COMMAND, ...]."""
    at = next((i for i, a in enumerate(argv) if a in VERBS), None)
    if at is None:
        print(f"zotune: error: zotune launch needs a command after the torchrun options ({', '.join(VERBS)}), e.g. "
              f"zotune launch --nproc-per-node 2 train parallel.data=2", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its banner
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # (its failure lines repeat the ranks' own)
    args = get_args_parser().parse_args([*argv[:at], "-m", "zotune", *argv[at:]])
    try:
        run(args)
    except ChildFailedError as e:
        # the first rank to fail (the agent then stops the others with SIGTERM): its own exit code
        first = e.get_first_failure()[1].exitcode or 1
        return first if first > 0 else 128 - first  # a signal -N as a shell reports it: 128 + N
    except KeyboardInterrupt:
        return 130
    return 0
