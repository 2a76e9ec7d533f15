"""`method.lr=auto`: the learning rate chosen by a short search on the training data, before the run.

The method's own default lr (its recipe for what trains) is the centre of a grid of `FACTORS`; each
lr trains from the base for `SHARE` of the run's forward passes, in a throwaway run folder (the
frozen prefix reused, as in the run), and is scored by its loss on `ROWS` training rows, the same
rows for every lr (forward passes only: the search needs no dev split). The largest loss decrease
from the base wins; among lrs whose decrease is within `TIE` of it the smallest is taken, since a
short search flatters large steps that a long run pays for. When no lr lowers the loss by more
than `SIGNAL` of the base loss (the search was too short for the method to move it, e.g. a few
coordinates a step), the search has nothing to go on and the method's default is kept, and said.
It also checks eps: when most steps' projected gradients are exactly 0 (probe losses equal to
float precision), eps is too small for this model and dtype, and the search says so.

The choice is written into config.yaml (a resume and a replay use that number) and the search into
the run's trial.json (`lr_search`: each lr's loss, steps, forward passes, seconds).
"""

from __future__ import annotations

import copy
import gc
import math
import shutil
import tempfile
import time
from pathlib import Path

from zotune.config import ConfigError
from zotune.models import resolve_source
from zotune.prefix import PrefixStore
from zotune.runs import RunFolder
from zotune.tasks import make_task

FACTORS = (0.1, 0.316, 1.0, 3.16, 10.0)  # times the method's default lr: a 5-point grid, half a decade apart
SHARE = 0.04  # of the run's forward passes, per lr: 20% of one run, 4% of a 5-run grid
ROWS = 128  # training rows each lr is scored on
TIE = 0.1  # an lr whose loss decrease is within this share of the best one's ties with it: the smaller wins
SIGNAL = 0.002  # a decrease below this share of the base loss is noise: no lr is chosen on it


def pop_auto_lr(values: dict) -> tuple[dict, bool]:
    """(`values` without `method.lr` when it is `auto`, whether it was)."""
    method = values.get("method", {})
    if str(method.get("lr", "")).strip().lower() != "auto":
        return values, False
    return {**values, "method": {k: v for k, v in method.items() if k != "lr"}}, True


def why_no_search(cfgs: dict) -> str | None:
    """Why `lr=auto` cannot search here (the method's default lr is then used), or None."""
    from zotune.trial import under_torchrun

    if under_torchrun(cfgs):
        return "under torchrun (the search runs in one process)"
    if cfgs["stream"].tier != "none":
        return "with streamed blocks (a search would stream every lr)"
    return None


def choose_lr(cfgs: dict, log=print, store: PrefixStore | None = None) -> tuple[dict, dict]:
    """(cfgs with the chosen `method.lr`, the search's record); `store`: the frozen prefixes the command's
    runs share (every lr's, the run's)."""
    from zotune.trial import try_candidate

    resolve_source(cfgs["model"])  # what is wrong with the model, the data or --out: said before any search
    task = make_task(cfgs["task"], None)
    if cfgs["run"].out:
        RunFolder.check_new(Path(cfgs["run"].out))
    if len(task.train) < 2:
        raise ConfigError("method.lr=auto needs training rows to search on; give an lr (e.g. method.lr=1e-3)")
    scored = copy.copy(task)
    scored.test = task.train[:ROWS]  # every lr scored on the same training rows
    default = cfgs["method"].lr
    run_forwards = cfgs["method"].forwards_in(cfgs["run"].steps)
    budget = SHARE * run_forwards
    rows, zero_shot, started = [], None, time.perf_counter()
    folder = tempfile.mkdtemp(prefix="zotune-lr-")
    try:
        for factor in FACTORS:
            trial_cfgs = copy.deepcopy(cfgs)
            trial_cfgs["method"].lr = float(f"{default * factor:.3g}")
            row = try_candidate(f"lr {trial_cfgs['method'].lr:g}", trial_cfgs, budget, scored, folder,
                                "loss", lambda *a: None, zero_shot, grads=True, required=True, store=store)
            result = row.pop("zero_shot_result", None)
            zero_shot = zero_shot or result
            rows.append(row)
            log(f"lr search: lr {row['lr']:g}: training loss {row.get('dev_loss', float('nan')):.4f} "
                f"(base {row.get('zero_shot_loss', float('nan')):.4f}) in {row.get('seconds', 0):.0f}s")
            gc.collect()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    chosen, why = _pick(rows, default)
    seconds = round(time.perf_counter() - started, 1)
    forwards = sum(r.get("forward_passes", 0) for r in rows)
    zero = sum(r.get("zero_grads", 0) for r in rows) / max(1, sum(r.get("steps", 0) for r in rows))
    log(f"method.lr=auto chose {chosen:g} ({why}): a search of {forwards:,} forward passes "
        f"({forwards / run_forwards:.0%} of the run's {run_forwards:,}) in {seconds:.0f}s")
    if zero > 0.5:
        log(f"note: {zero:.0%} of the search's projected gradients were exactly 0: method.eps="
            f"{cfgs['method'].eps:g} is too small for this model's precision; try method.eps=1e-2")
    cfgs = copy.deepcopy(cfgs)
    cfgs["method"].lr = chosen
    record = {"chosen": chosen, "default": default, "why": why, "factors": list(FACTORS), "share": SHARE,
              "rows": ROWS, "tried": rows, "forward_passes": forwards, "run_forward_passes": run_forwards,
              "seconds": seconds, "zero_gradient_share": round(zero, 3)}
    return cfgs, record


def _pick(rows: list[dict], default: float) -> tuple[float, str]:
    """The lr to train with and why: the largest loss decrease, the smallest lr within TIE of it."""
    finite = [r for r in rows if r.get("dev_loss") is not None and math.isfinite(r["dev_loss"])]
    better = [r for r in finite if r["dev_loss"] < r["zero_shot_loss"]]
    if not better:
        return default, "no lr lowered the training loss in the search: the method's default"
    drop = {id(r): r["zero_shot_loss"] - r["dev_loss"] for r in better}
    best = max(better, key=lambda r: drop[id(r)])
    if drop[id(best)] <= SIGNAL * abs(best["zero_shot_loss"]):
        return default, (f"no lr moved the training loss by more than {SIGNAL:.1%} (best {best['dev_loss']:.4f}, "
                         f"base {best['zero_shot_loss']:.4f}): too few steps to tell; the method's default")
    near = min((r for r in better if drop[id(r)] >= (1 - TIE) * drop[id(best)]), key=lambda r: r["lr"])
    return near["lr"], f"training loss {near['dev_loss']:.4f}, base {near['zero_shot_loss']:.4f}"
