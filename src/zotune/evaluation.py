"""Evaluation: a task's metrics and loss for a model (`evaluate`, in the training loop too), and `zotune eval`
for a model or a run's trained weights, without training."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zotune.config import ConfigError
from zotune.files import check_new_file
from zotune.models import load_model
from zotune.parallel import SOLO, Group
from zotune.precision import set_tf32
from zotune.resolve import resolve_configs, resolve_device
from zotune.runs import RunFolder, RunRecord
from zotune.tasks import make_task
from zotune.tasks.base import METRICS, Task
from zotune.weights import open_run_weights

SPLITS = ("dev", "test", "train")


@torch.inference_mode()
def evaluate(model, task: Task, examples, batch_size: int, device, desc: str = "eval", group: Group = SOLO) -> dict:
    """The task's metrics (`metric` names the headline) and mean loss, batched and grouped by length.

    With a process group every rank evaluates its share of the examples and the counts are summed.
    """
    model.eval()
    examples = examples[group.rank::group.world]
    counts = task.zero_counts()
    batches = list(task.batches(examples, batch_size, by_length=True)) if examples else []
    lockstep = group.world > 1  # every rank runs as many forwards (streamed blocks are fetched together)
    if lockstep:
        extra = int(group.max([len(batches)])[0]) - len(batches)
        for _ in range(extra):
            task.evaluate_batch(model, task.collate(task.test[:1] or task.train[:1]).to(device), lockstep)
    with tqdm(total=len(examples), desc=desc, unit="ex", leave=False, file=sys.stderr,
              disable=not group.is_main) as bar:
        for batch in batches:
            for key, value in task.evaluate_batch(model, batch.to(device), lockstep).items():
                counts[key] += value
            bar.update(len(batch))
    counts = dict(zip(counts, group.sum(list(counts.values()))))
    return task.metrics(counts)


def metric_record(prefix: str, result: dict) -> dict:
    """The metrics.jsonl fields of an evaluation: its headline metric and its loss."""
    return {f"{prefix}_{result['metric']}": result[result["metric"]], f"{prefix}_loss": result["loss"]}


def evaluate_source(source: str | None, overrides=(), splits=("dev", "test"), out: str | None = None,
                    batch_size: int | None = None, device: str = "auto", log=print, task: str | None = None) -> dict:
    """Evaluate `source` (a model zotune can load, or a run folder) on the task's splits.

    A run folder is evaluated at its latest logged step with its own task, unless `task.*`
    overrides change it; it is only read (a run that is training may be evaluated). Returns and
    writes (to `out`, default RUN/eval.json for a run, else ./eval.json) one JSON object.
    """
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"--split {','.join(splits)}: choose from {', '.join(SPLITS)}")
    changed = {o.split("=", 1)[0].split(".", 1)[0] for o in overrides}
    run_dir = Path(source) if source and (Path(source) / "config.yaml").is_file() else None
    path = Path(out) if out else (run_dir / "eval.json" if run_dir else Path("eval.json"))
    check_new_file(path, "--out" if out else "the output file", own=_an_evaluation)  # before any work
    target = resolve_device(device)
    started = time.perf_counter()
    if run_dir is not None:
        if changed - {"task", "run"}:
            raise ConfigError("a run folder is evaluated with its own model and method: pass only task.* or run.* "
                              "options (e.g. task.data=other.csv)")
        cfgs = resolve_configs(run_dir / "config.yaml", overrides, run_folder=True, task=task)
        evaluated = make_task(cfgs["task"], None)  # bad data stops before the model loads
        disk = cfgs["stream"].tier == "disk"
        run = RunFolder(run_dir, resume=True) if disk else RunRecord(run_dir)  # a disk tier's blocks are written to
        try:
            session, records = open_run_weights(run, cfgs, target, log, also_free=("task", "run"))
            # a RAM-tier run is evaluated streamed too: only the blocks' outside on the device
            session.start_streaming()
        finally:
            if disk:
                run.close()
        model, tokenizer, step = session.model, session.tokenizer, len(records)
    else:
        cfgs = resolve_configs(None, overrides, {"model": {"name": source}} if source else None, task=task)
        evaluated = make_task(cfgs["task"], None)
        model, tokenizer = load_model(cfgs["model"], log=log)
        model.to(target)
        session, step = None, None
    task_cfg, run_cfg = cfgs["task"], cfgs["run"]
    set_tf32(target, cfgs["model"].tf32)  # the products the run was trained with
    evaluated.bind(tokenizer)
    results = {}
    for split in splits:
        results[split] = evaluate(model, evaluated, getattr(evaluated, split), batch_size or run_cfg.eval_batch_size,
                                  target, desc=split)
    if session is not None:
        session.close()
    summary = {"model": cfgs["model"].name, "run": str(run_dir) if run_dir else None, "step": step,
               "task": {k: v for k, v in dataclasses.asdict(task_cfg).items() if v not in ("", [], {})},
               "splits": results, "seconds": round(time.perf_counter() - started, 1)}
    path.write_text(json.dumps(summary, indent=2) + "\n")
    what = f"run {run_dir} at step {step}" if run_dir else cfgs["model"].name
    names = METRICS[task_cfg.type]
    log(f"\n{what} on {evaluated.describe()}")
    log(f"{'split':8}{'examples':>10}" + "".join(f"{m:>13}" for m in names) + f"{'loss':>10}")
    for split, r in results.items():
        log(f"{split:8}{r['n']:>10}" + "".join(f"{r[m]:>13.3f}" for m in names) + f"{r['loss']:>10.4f}")
    log(f"{summary['seconds']:.0f}s; wrote {path}")
    return summary


def _an_evaluation(path: Path) -> bool:
    """Whether `path` is the JSON of an earlier `zotune eval` (which a new one may replace)."""
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and {"model", "run", "step", "task", "splits"} <= set(written)
