"""What a run folder tells people: the headline metric of a metrics.jsonl row, and curve.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def headline(row: dict[str, Any], split: str) -> tuple[str, float] | None:
    """(metric, value) of the evaluation of `split` (dev or test) a metrics.jsonl row holds, if any: its
    `<split>_<metric>` field (an evaluation logs its headline metric and its loss)."""
    for key, value in row.items():
        if key.startswith(f"{split}_") and key != f"{split}_loss":
            return key[len(split) + 1:], value
    return None


def plot(folder: Path) -> Path:
    """curve.png: training loss (and its running mean) and the dev metric against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evaluations = [(r["step"], headline(r, "dev")) for r in rows]
    dev = [(step, found[1]) for step, found in evaluations if found]
    metric = next((found[0] for _, found in evaluations if found), "accuracy")
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
    ax2.set(xlabel="step", ylabel=f"dev {metric}", title=f"dev {metric}")
    fig.tight_layout()
    out = folder / "curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
