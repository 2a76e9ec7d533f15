"""`zotune compare`: several methods and setups on one task with the same budget of forward passes.

Each run is `METHOD [section.key=value ...]` on top of the shared options; its steps are the budget
divided by the method's forwards per step, and its dev set is evaluated at the same forward-pass
counts as every other run's. Writes each run's folder, then `compare.json`, `compare.md` (a table)
and `compare.png` (the dev metric against forward passes).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from zotune.config import ConfigError
from zotune.runs import headline


def _parse_run(text: str) -> tuple[str, list[str]]:
    words = shlex.split(text)
    if not words or "=" in words[0]:
        raise ConfigError(f"--run {text!r}: start with a method name, e.g. --run \"zoadam method.lr=1e-4\"")
    return words[0], words[1:]


def compare(runs: list[str], forwards: int, evals: int, out: str, shared: list[str], log=print) -> list[dict]:
    from zotune.methods import METHODS
    from zotune.train import resolve_configs, train

    if not runs:
        raise ConfigError("give at least one --run METHOD [section.key=value ...]")
    if forwards < 1 or evals < 1:
        raise ConfigError("--forwards and --evals must be >= 1")
    folder = Path(out)
    if (folder / "compare.json").exists():
        raise ConfigError(f"{folder} already holds a comparison; pass a new --out")
    plans = []
    for text in runs:  # every run is checked before the first one starts
        name, overrides = _parse_run(text)
        if name not in METHODS:
            raise ConfigError(f"--run {text!r}: {name!r} is not a method; choose one of {', '.join(METHODS)}")
        label = " ".join([name, *overrides])
        cfgs = resolve_configs(None, [*shared, f"method.name={name}", *overrides])
        per_step = cfgs["method"].forwards_per_step
        steps = forwards // per_step
        if steps < evals:
            raise ConfigError(f"--run {text!r}: {forwards} forward passes are only {steps} steps of {per_step} "
                              f"forwards; raise --forwards")
        cfgs["run"].steps = steps
        cfgs["run"].eval_every = steps // evals
        cfgs["run"].out = str(folder / f"{len(plans) + 1:02d}-{name}")
        plans.append((label, per_step, cfgs))
    rows = []
    for label, per_step, cfgs in plans:
        log(f"== {label}: {cfgs['run'].steps} steps x {per_step} forwards")
        summary = train(cfgs, log=log)
        metrics = [json.loads(line) for line in (Path(cfgs["run"].out) / "metrics.jsonl").read_text().splitlines()]
        dev = [(r["step"] * per_step, headline(r, "dev")[1]) for r in metrics if headline(r, "dev")]
        metric = summary["before"]["metric"]
        rows.append({"run": label, "status": summary["status"], "steps": summary["steps"], "forwards": summary["steps"] * per_step,
                     "metric": metric, "dev": dev, "test_before": summary["before"][metric],
                     "test_after": summary.get("after", {}).get(metric), "seconds": summary["seconds"],
                     "folder": cfgs["run"].out})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (folder / "compare.md").write_text(table(rows))
    plot(rows, folder / "compare.png")
    log(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    metric = rows[0].get("metric", "accuracy") if rows else "accuracy"
    lines = [f"| run | forward passes | steps | best dev {metric} | final dev | test before -> after | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        devs = [a for _, a in r["dev"]]
        after = f"{r['test_after']:.3f}" if r["test_after"] is not None else r["status"]
        lines.append(f"| {r['run']} | {r['forwards']:,} | {r['steps']:,} | {max(devs):.3f} | {devs[-1]:.3f} | "
                     f"{r['test_before']:.3f} -> {after} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(*zip(*r["dev"]), marker="o", label=r["run"])
    ax.set(xlabel="forward passes", ylabel=f"dev {rows[0].get('metric', 'accuracy') if rows else 'accuracy'}",
           title="same budget of forward passes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
