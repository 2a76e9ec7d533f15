"""Experiment trackers a run also logs to when asked (`run.report_to`): TensorBoard, Weights & Biases.

Neither is a dependency: asking for one that is not installed stops the run before any work, with
the command that installs it. The run folder's metrics.jsonl stays the record; trackers get copies
of its numeric fields, keyed by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zotune.config import ConfigError

TRACKERS = ("tensorboard", "wandb")
_SKIPPED = {"step", "seed", "n", "seconds"}  # bookkeeping, not curves


def tracker_names(report_to: str) -> list[str]:
    """`run.report_to` as a list of tracker names ("none": []), each checked."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"run.report_to={report_to!r}: {unknown[0]!r} is not a tracker; use none, "
                          f"{', '.join(TRACKERS)} or a comma-separated list")
    return names


def _scalars(record: dict[str, Any]):
    for key, value in record.items():
        if key in _SKIPPED or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            yield key, float(value)
        elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], (int, float)):
            yield key, float(value[0])  # one direction's projected gradient


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("run.report_to=tensorboard needs the tensorboard package: pip install "
                              "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{config}\n```")

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record):
            self.writer.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("run.report_to=wandb needs the wandb package: pip install wandb (and "
                              "`wandb login`)") from None
        self.wandb = wandb
        self.run = wandb.init(project="zotune", name=run_dir.name, dir=str(run_dir), config=config, resume="allow",
                              id=run_dir.resolve().name)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(dict(_scalars(record)), step=record.get("step", 0))

    def close(self) -> None:
        self.run.finish()


def open_trackers(report_to: str, run_dir: Path, config: dict) -> list:
    makers = {"tensorboard": _TensorBoard, "wandb": _WandB}
    return [makers[name](run_dir, config) for name in tracker_names(report_to)]
