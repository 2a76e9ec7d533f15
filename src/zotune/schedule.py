"""The schedule of a run: the order of its batches (`batch_order`), and the learning rate's factor on
every parameter group's lr, step by step (`lr_factor`).

`lr_factor(kind, step, total, warmup)` for step 1..total: a linear warm-up from lr/warmup to lr
over the first `warmup` steps, then `constant` (1), `linear` (down to lr/(total - warmup) at the
last step, as HF's linear schedule) or `cosine` (half a cosine from lr towards 0). The lr each
step used is in its record of steps.log, so replay and resume never recompute it.
"""

from __future__ import annotations

import math

import torch

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


def batch_order(n_examples: int, batch_size: int, seed: int, lengths: list[int] | None = None):
    """(batch id, example indices) forever: batches are fixed once, their order reshuffled every epoch.

    Fixed batches let the frozen prefix of each batch be computed once and kept across epochs. With
    `lengths`, the shuffled examples are sorted by length within groups of 50 batches (the grouping
    of HF's `group_by_length`): a batch holds similar lengths, so little of it is padding.
    """
    gen = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n_examples, generator=gen).tolist()
    if lengths is not None:
        group = 50 * batch_size
        shuffled = [i for start in range(0, n_examples, group)
                    for i in sorted(shuffled[start: start + group], key=lengths.__getitem__)]
    batches = [shuffled[i: i + batch_size] for i in range(0, n_examples, batch_size)]
    while True:
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield b, batches[b]
