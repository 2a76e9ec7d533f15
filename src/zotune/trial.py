"""`model.trainable=auto`: what to train, chosen by a short trial scored on dev.

When a `zotune train` names nothing to train (and no adapter), each candidate below trains for the
same number of forward passes (`SHARE` of the shortest candidate run's) with its own measured recipe
(method, lr, batch), in a throwaway run folder, and is scored on the dev split. The first candidate
that beats zero-shot is held; a later one replaces it only when its dev metric is higher by more than
twice the noise of two scores on that split (`_pick`); the one held is what the run then trains,
from the base, with its whole recipe. The choice is written into config.yaml (a resume or a replay
trains exactly that) and the trial itself into the run's trial.json: each candidate's dev score,
steps, forward passes, seconds.

The trial runs only where it can be compared fairly and cheaply: one process, a resident model, a dev
split. Elsewhere (torchrun, --offload, no dev split) `auto` is the probe, and the run says why.
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

from zotune.config import ConfigError, merge
from zotune.models import resolve_source
from zotune.prefix import PrefixStore
from zotune.resolve import build_configs, settle_auto
from zotune.runs import RunFolder, RunRecord
from zotune.stream import is_stream_folder
from zotune.tasks import make_task
from zotune.train import train

# Each candidate trains for SHARE of the forward passes of the shortest candidate run (steps x forwards a
# step), so the three together cost at most 15% of the run that follows, whichever is chosen.
SHARE = 0.05

# name -> (the layer that makes it, defaults under the user's own values): each with its measured recipe.
# The probe and the blocks take TRAINABLE_DEFAULTS and the section defaults (FZOO on the final norm; LOZO);
# LoRA r = 8 takes ZO-SGD at lr 1e-3, its best in docs/compare.md ("LoRA r = 8 on PEFT's default modules").
CANDIDATES = {
    "final-norm": ({"model": {"trainable": "final-norm"}}, {}),
    "last-blocks:2": ({"model": {"trainable": "last-blocks:2"}}, {}),
    "lora": ({"model": {"trainable": "final-norm"}, "adapter": {"kind": "lora"}},
             {"method": {"name": "zosgd", "lr": 1e-3}}),
}


def under_torchrun(cfgs: dict) -> bool:
    """Whether this run has several processes (a trial or an lr search runs in one)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfgs["parallel"].data * cfgs["parallel"].perturb > 1


def why_no_trial(values: dict) -> str | None:
    """Why `auto` cannot run its trial here (it is then the probe), or None."""
    cfgs = build_configs(settle_auto(values))
    if under_torchrun(cfgs):
        return "under torchrun (the trial runs in one process)"
    if cfgs["stream"].tier != "none" or is_stream_folder(cfgs["model"].name):
        return "with streamed blocks (a trial would stream every candidate)"
    if not (cfgs["task"].dev or cfgs["task"].n_dev):
        return "without a dev split to score it (task.n_dev=0)"
    return None


def candidate_values(values: dict) -> dict[str, dict]:
    """Each candidate's values: its defaults, under the user's values, under what makes it the candidate."""
    return {name: merge(defaults if not values.get("method") else {}, values, layer)
            for name, (layer, defaults) in CANDIDATES.items()}


def choose_trainable(values: dict, log=print, store: PrefixStore | None = None) -> tuple[dict, dict]:
    """(the configs of the chosen candidate's run, the trial's record for trial.json); `store`: the frozen
    prefixes the command's runs share (the candidates', the run's)."""
    plans = {name: build_configs(v) for name, v in candidate_values(values).items()}
    first = next(iter(plans.values()))
    resolve_source(first["model"])  # what is wrong with the model, the data or --out: said before any trial
    task = make_task(first["task"], None)  # the same rows for every candidate
    if first["run"].out:
        RunFolder.check_new(Path(first["run"].out))
    scored = copy.copy(task)
    scored.test = task.dev  # each trial run's before/after evaluation is of the dev split
    metric = task.cfg.metric
    rows, started = [], time.perf_counter()
    folder = tempfile.mkdtemp(prefix="zotune-trial-")
    try:
        budget = SHARE * min(c["method"].forwards_in(c["run"].steps) for c in plans.values())
        zero_shot = None  # every candidate starts from the base (LoRA's B is zero): scored on dev once
        for name, cfgs in plans.items():
            rows.append(try_candidate(name, cfgs, budget, scored, folder, metric, log, zero_shot, store=store))
            result = rows[-1].pop("zero_shot_result", None)
            zero_shot = zero_shot or result
            gc.collect()  # the candidate's model is gone before the next one loads
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    tried = [r for r in rows if r.get("dev") is not None]
    if not tried:
        raise ConfigError("model.trainable=auto: no candidate could be tried (" + "; ".join(
            f"{r['candidate']}: {r['error']}" for r in rows) + "); name what to train with --trainable")
    best = _pick(tried, len(task.dev))
    chosen = plans[best["candidate"]]
    seconds = round(time.perf_counter() - started, 1)
    forwards = sum(r.get("forward_passes", 0) for r in rows)
    run_forwards = chosen["method"].forwards_in(chosen["run"].steps)
    log(f"model.trainable=auto chose {best['candidate']} (dev {metric} {best['dev']:.3f}; zero-shot "
        f"{best['zero_shot']:.3f}): a trial of {forwards:,} forward passes ({forwards / run_forwards:.0%} of the run's "
        f"{run_forwards:,}) in {seconds:.0f}s")
    trial = {"chosen": best["candidate"], "share": SHARE, "metric": metric, "candidates": rows,
             "forward_passes": forwards, "run_forward_passes": run_forwards, "seconds": seconds}
    return chosen, trial


NOISE = 2.0  # standard errors of the difference of two dev scores a later candidate must lead by


def _pick(tried: list[dict], n_dev: int) -> dict:
    """The candidate to train, in the table's order (cheapest and steadiest first). The one held is the first
    that beat zero-shot on dev; a later one replaces it only when its dev metric is higher by more than
    NOISE standard errors of the difference of two scores on these n_dev examples, sqrt(2·p·(1 − p) / n)
    (0.041 at p = 0.79 on 200): a few dozen steps' scores are noisy, and the earlier candidates learn more
    steadily over a whole run. When none beat zero-shot, the first (the run then keeps its best dev step,
    zero-shot included)."""
    held = None
    for row in tried:
        if row["dev"] <= row["zero_shot"]:
            continue  # not learning in the trial: never held, never replaces
        if held is None:
            held = row
            continue
        p = min(max(held["dev"], 0.0), 1.0)
        row["margin"] = round(NOISE * (2 * p * (1 - p) / max(1, n_dev)) ** 0.5, 4)
        if row["dev"] > held["dev"] + row["margin"]:
            held = row
    return held or tried[0]


def try_candidate(name: str, cfgs: dict, budget: float, scored, folder: str, metric: str, log, zero_shot=None,
                  grads: bool = False, required: bool = False, store: PrefixStore | None = None) -> dict:
    """One candidate (what to train, or an lr: `zotune.lr_search`), trained for `budget` forward passes in a
    throwaway folder, scored on `scored.test`; `grads`: count the steps whose projected gradients were all 0;
    `required`: a candidate that cannot run stops the command (else only the probe's does); `store`: the
    frozen prefixes the command's runs share."""
    cfgs = copy.deepcopy(cfgs)
    run = cfgs["run"]
    steps = cfgs["method"].steps_within(budget)
    run.steps, run.eval_every, run.keep, run.patience = steps, 0, "last", 0
    run.snapshot_every, run.report_to, run.out = 0, "none", os.path.join(folder, name.replace(":", "-"))
    what = f"{name} ({cfgs['method'].name}, lr {cfgs['method'].lr:g}, batch {run.batch_size})"
    log(f"trial: {what}, {steps} steps")
    try:
        summary = train(cfgs, log=lambda *a, **k: None, task=scored, zero_shot=zero_shot, prefix_store=store)
    except ConfigError as e:  # a candidate this model cannot take (e.g. no LoRA modules PEFT knows)
        if required or name == next(iter(CANDIDATES)):
            raise  # the probe fits every model: its error is the run's
        log(f"trial: {name} skipped ({e})")
        return {"candidate": name, "error": str(e)}
    if summary["status"] == "interrupted":
        raise KeyboardInterrupt  # Ctrl-C during the trial stops the command, not only this candidate
    after = summary.get("after")
    row = {"candidate": name, "method": cfgs["method"].name, "lr": cfgs["method"].lr, "steps": summary["steps"],
           "batch_size": run.batch_size, "forward_passes": summary["forward_passes"], "seconds": summary["seconds"],
           "zero_shot": summary["before"][metric], "zero_shot_loss": summary["before"]["loss"],
           "dev": after[metric] if after else None, "dev_loss": after["loss"] if after else None,
           "status": summary["status"], "zero_shot_result": summary["before"]}
    if grads:
        records, _ = RunRecord(run.out).read_steps()
        row["zero_grads"] = sum(1 for r in records if not any(r.grads))
    if after:
        log(f"trial: {name}: dev {metric} {after[metric]:.3f} (zero-shot {row['zero_shot']:.3f}) in "
            f"{summary['seconds']:.0f}s")
    return row
