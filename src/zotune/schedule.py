"""How a run trains over time: its settings (`RunConfig`: steps, batches, evaluations, snapshots, where
it goes), the order of its batches (`batch_order`), and the learning rate's factor on every parameter
group's lr, step by step (`lr_factor`).

`lr_factor(kind, step, total, warmup)` for step 1..total: a linear warm-up from lr/warmup to lr
over the first `warmup` steps, then `constant` (1), `linear` (down to lr/(total - warmup) at the
last step, as HF's linear schedule) or `cosine` (half a cosine from lr towards 0). The lr each
step used is in its record of steps.log, so replay and resume never recompute it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zotune.config import ConfigError
from zotune.trackers import tracker_names

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class RunConfig:
    """How long to train and where the run goes."""

    out: str | None = None  # default: runs/<timestamp>
    steps: int = 1200
    batch_size: int = 16
    eval_batch_size: int = 32
    eval_every: int = 300  # dev evaluation every N steps (0: only at the end)
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    prefix_cache_mb: int = 2048  # frozen-prefix outputs kept across epochs (0: recompute every step)
    snapshot_every: int = 200  # trainable tensors saved every N steps to bound replay on resume (0: never)
    group_by_length: bool = True  # training batches of similar lengths (less padding), as HF's Trainer option
    report_to: str = "none"  # also log to: tensorboard, wandb, or both comma-separated (when installed)
    lr_schedule: str = "constant"  # constant, linear or cosine (zotune.schedule), after a linear warm-up
    warmup_steps: int = 0
    # the weights a run ends with: last, best (the step of the best dev metric, zero-shot included), or
    # auto: best wherever the run can keep it (dev evaluations, a resident model), else last
    keep: str = "auto"
    patience: int = 0  # stop after this many dev evaluations without a better one (0: never stop early)

    def __post_init__(self):
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"run.lr_schedule={self.lr_schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"run.warmup_steps={self.warmup_steps} must be >= 0")
        if self.keep not in ("auto", "last", "best"):
            raise ConfigError(f"run.keep={self.keep!r}: use last (the final step), best (the best dev evaluation) or "
                              f"auto (best where the run can keep it)")
        if self.patience < 0:
            raise ConfigError(f"run.patience={self.patience} must be >= 0 (0: never stop early)")
        if not 0 <= self.steps < 2**32:
            raise ConfigError(f"run.steps={self.steps} must be >= 0 and below 2**32 (steps.log counts steps in 32 "
                              f"bits; at a step a second that is 136 years)")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("run.batch_size and run.eval_batch_size must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"run.eval_every={self.eval_every} must be >= 0 (0 evaluates only at the end)")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            raise ConfigError(f"run.device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        if self.prefix_cache_mb < 0:
            raise ConfigError(f"run.prefix_cache_mb={self.prefix_cache_mb} must be >= 0 (0 turns the cache off)")
        if self.snapshot_every < 0:
            raise ConfigError(f"run.snapshot_every={self.snapshot_every} must be >= 0 (0: the log alone)")
        if self.threads < 0:
            raise ConfigError(f"run.threads={self.threads} must be >= 0")
        tracker_names(self.report_to)  # an unknown tracker stops the run here


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
