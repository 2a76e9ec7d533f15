"""The run folder: config.yaml, metrics.jsonl, summary.json and curve.png."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zotune.config import ConfigError


@dataclass
class RunConfig:
    """How long to train and where the run goes."""

    out: str | None = None  # default: runs/<timestamp>
    steps: int = 1200
    batch_size: int = 16
    eval_batch_size: int = 32
    eval_every: int = 300  # dev accuracy every N steps (0: only at the end)
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    prefix_cache_mb: int = 2048  # frozen-prefix outputs kept across epochs (0: recompute every step)

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"run.steps={self.steps} must be >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("run.batch_size and run.eval_batch_size must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"run.eval_every={self.eval_every} must be >= 0 (0 evaluates only at the end)")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            raise ConfigError(f"run.device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        if self.prefix_cache_mb < 0:
            raise ConfigError(f"run.prefix_cache_mb={self.prefix_cache_mb} must be >= 0 (0 turns the cache off)")
        if self.threads < 0:
            raise ConfigError(f"run.threads={self.threads} must be >= 0")


class RunFolder:
    """Append-only files of one run; every line is flushed so a killed run keeps what it logged."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        if (self.path / "summary.json").exists() or (self.path / "metrics.jsonl").exists():
            raise ConfigError(f"run folder {self.path} already holds a run; pass another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write the run folder {self.path} ({e.strerror}); pass a writable --out") from None
        self._metrics = (self.path / "metrics.jsonl").open("a", encoding="utf-8")

    def write_config(self, sections: dict[str, Any]) -> None:
        import yaml

        self._atomic_write("config.yaml", yaml.safe_dump(sections, sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._atomic_write("summary.json", json.dumps(summary, indent=2) + "\n")

    def _atomic_write(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path / name)

    def close(self) -> None:
        self._metrics.close()

    def plot(self) -> Path:
        """curve.png: training loss (and its running mean) and dev accuracy against steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
        dev = [(r["step"], r["dev_accuracy"]) for r in rows if "dev_accuracy" in r]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        if train:
            steps, losses = zip(*train)
            ax1.plot(steps, losses, lw=0.6, alpha=0.4, label="step loss")
            window = max(1, len(losses) // 20)
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            ax1.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
            ax1.legend()
        ax1.set(xlabel="step", ylabel="training loss", title="loss")
        if dev:
            ax2.plot(*zip(*dev), marker="o")
        ax2.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
        fig.tight_layout()
        out = self.path / "curve.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out
