"""`zotune compare`: several methods and setups on one task with the same budget of forward passes.

Each run is `METHOD [section.key=value ...]` on top of the shared options; its steps are the most
whose forward passes fit the budget, and its dev set is evaluated at the same forward-pass counts as
every other run's (with AdaZeta's query schedule, whose steps grow, at equal steps instead: the table
and the plot place each evaluation at its own forward-pass count). Writes each run's folder, then
`compare.json`, `compare.md` (a table) and `compare.png` (the dev metric against forward passes).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from zotune.config import ConfigError
from zotune.files import check_new_folder
from zotune.methods import METHODS, unknown_method
from zotune.report import headline
from zotune.resolve import resolve_configs
from zotune.train import train


def _parse_run(text: str) -> tuple[str, list[str]]:
    words = shlex.split(text)
    if not words or "=" in words[0]:
        raise ConfigError(f"--run {text!r}: start with a method name, e.g. --run \"zoadam method.lr=1e-4\"")
    return words[0], words[1:]


def compare(runs: list[str], forwards: int, evals: int, out: str, shared: list[str], log=print,
            seeds: tuple[int, ...] = (0,), target: float | None = None) -> list[dict]:
    """Each run once per seed (`run.seed`: step seeds and data order); the table gives each run's mean
    and spread over the seeds and, with `target`, the forward passes each needed to reach that dev metric."""
    if not runs:
        raise ConfigError("give at least one --run METHOD [section.key=value ...]")
    if forwards < 1 or evals < 1:
        raise ConfigError("--forwards and --evals must be >= 1")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds, e.g. 0,1,2")
    folder = Path(out)
    if (folder / "compare.json").exists():
        raise ConfigError(f"{folder} already holds a comparison; pass a new --out")
    check_new_folder(folder, "--out")
    plans = []
    for text in runs:  # every run is checked before the first one starts
        name, overrides = _parse_run(text)
        if name not in METHODS:
            raise ConfigError(f"--run {text!r}: {unknown_method(name)}")
        label = " ".join([name, *overrides])
        for seed in seeds:
            cfgs = resolve_configs(None, [*shared, f"method.name={name}", *overrides, f"run.seed={seed}"])
            per_step = cfgs["method"].forwards_per_step
            steps = cfgs["method"].steps_within(forwards) if forwards >= per_step else 0  # (a query schedule grows)
            if steps < evals:
                raise ConfigError(f"--run {text!r}: {forwards} forward passes are only {steps} steps of {per_step} "
                                  f"forwards; raise --forwards")
            cfgs["run"].steps = steps
            cfgs["run"].eval_every = steps // evals
            suffix = f"-seed{seed}" if len(seeds) > 1 else ""
            cfgs["run"].out = str(folder / f"{len(plans) // len(seeds) + 1:02d}-{name}{suffix}")
            plans.append((label, seed, per_step, cfgs))
    rows = []
    for label, seed, per_step, cfgs in plans:
        log(f"== {label} (seed {seed}): {cfgs['run'].steps} steps x {per_step} forwards")
        summary = train(cfgs, log=log)
        metrics = [json.loads(line) for line in (Path(cfgs["run"].out) / "metrics.jsonl").read_text().splitlines()]
        at = cfgs["method"].forwards_in  # forward passes after a step (a query schedule's steps grow)
        dev = [(at(r["step"]), headline(r, "dev")[1]) for r in metrics if headline(r, "dev")]
        metric = summary["before"]["metric"]
        rows.append({"run": label, "seed": seed, "status": summary["status"], "steps": summary["steps"],
                     "forwards": at(summary["steps"]), "metric": metric, "dev": dev,
                     "test_before": summary["before"][metric], "test_after": summary.get("after", {}).get(metric),
                     "reached": _reached(dev, target), "seconds": summary["seconds"], "folder": cfgs["run"].out})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (folder / "compare.md").write_text(table(rows, target))
    plot(rows, folder / "compare.png")
    log(table(rows, target))
    return rows


def _reached(dev: list[tuple[int, float]], target: float | None) -> int | None:
    """The forward passes at the first dev evaluation at or above `target` (None: never, or no target)."""
    if target is None:
        return None
    return next((f for f, value in dev if value >= target), None)


def _mean_spread(values: list[float]) -> str:
    """`mean ± sample standard deviation` (just the value for one seed)."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict], target: float | None = None) -> str:
    """One line per run: over its seeds, the mean ± spread of its best and final dev metric and of its
    test metric after training, and (with `target`) the forward passes it took to reach the target."""
    metric = rows[0].get("metric", "accuracy") if rows else "accuracy"
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["run"], []).append(r)
    reach = [f" | forwards to dev {metric} >= {target}"] if target is not None else [""]
    header = (f"| run | seeds | forward passes | steps | best dev {metric} | final dev | test before -> after"
              f"{reach[0]} | seconds |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]  # one rule per column, or the table does not render
    for label, group in groups.items():
        first = group[0]
        best = _mean_spread([max(a for _, a in r["dev"]) for r in group])
        final = _mean_spread([r["dev"][-1][1] for r in group])
        done = [r["test_after"] for r in group if r["test_after"] is not None]
        after = _mean_spread(done) if len(done) == len(group) else first["status"]
        line = (f"| {label} | {len(group)} | {first['forwards']:,} | {first['steps']:,} | {best} | {final} | "
                f"{_mean_spread([r['test_before'] for r in group])} -> {after}")
        if target is not None:
            got = [r["reached"] for r in group]
            line += " | " + (f"{sum(got) / len(got):,.0f}" if None not in got else
                             f"not by {first['forwards']:,} in {got.count(None)} of {len(got)}")
        lines.append(line + f" | {sum(r['seconds'] for r in group) / len(group):.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(*zip(*r["dev"]), marker="o", label=r["run"] + (f" (seed {r['seed']})" if "seed" in r else ""))
    ax.set(xlabel="forward passes", ylabel=f"dev {rows[0].get('metric', 'accuracy') if rows else 'accuracy'}",
           title="same budget of forward passes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
