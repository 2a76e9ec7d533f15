"""The learning-rate schedule of a run: a factor on every parameter group's lr, step by step.

`lr_factor(kind, step, total, warmup)` for step 1..total: a linear warm-up from lr/warmup to lr
over the first `warmup` steps, then `constant` (1), `linear` (down to lr/(total - warmup) at the
last step, as HF's linear schedule) or `cosine` (half a cosine from lr towards 0). The lr each
step used is in its record of steps.log, so replay and resume never recompute it.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(kind: str, step: int, total: int, warmup: int = 0) -> float:
    """The factor on the base lr for step `step` (1-based) of a run of `total` steps."""
    if warmup and step <= warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    done = (step - 1 - warmup) / max(1, total - warmup)  # 0 at the first step after the warm-up
    if kind == "linear":
        return 1.0 - done
    return 0.5 * (1.0 + math.cos(math.pi * done))
