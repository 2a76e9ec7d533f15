"""`zotune eval`: the task's metrics and loss for a model, or for a run's trained weights, without training."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from zotune.config import ConfigError
from zotune.tasks.base import METRICS

SPLITS = ("dev", "test", "train")


def evaluate_source(source: str | None, overrides=(), splits=("dev", "test"), out: str | None = None,
                    batch_size: int | None = None, device: str = "auto", log=print, task: str | None = None) -> dict:
    """Evaluate `source` (a model zotune can load, or a run folder) on the task's splits.

    A run folder is evaluated at its latest logged step with its own task, unless `task.*`
    overrides change it; it is only read (a run that is training may be evaluated). Returns and
    writes (to `out`, default RUN/eval.json for a run, else ./eval.json) one JSON object.
    """
    from zotune.runs import FollowerRun, RunFolder
    from zotune.tasks import make_task
    from zotune.train import Session, evaluate, kept_records, resolve_configs, resolve_device

    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"--split {','.join(splits)}: choose from {', '.join(SPLITS)}")
    changed = {o.split("=", 1)[0].split(".", 1)[0] for o in overrides}
    run_dir = Path(source) if source and (Path(source) / "config.yaml").is_file() else None
    target = resolve_device(device)
    started = time.perf_counter()
    if run_dir is not None:
        if changed - {"task", "run"}:
            raise ConfigError("a run folder is evaluated with its own model and method: pass only task.* or run.* "
                              "options (e.g. task.data=other.csv)")
        cfgs = resolve_configs(run_dir / "config.yaml", overrides, run_folder=True, task=task)
        evaluated = make_task(cfgs["task"], None)  # bad data stops before the model loads
        disk = cfgs["stream"].tier == "disk"
        run = RunFolder(run_dir, resume=True) if disk else FollowerRun(run_dir)  # a disk tier's blocks are written to
        try:
            records, problem = run.read_steps()
            if problem:
                log(problem)
            records = kept_records(run, cfgs, records, log)
            session = Session(cfgs, run, target, log)
            session.restore(records)
            session.start_streaming()  # a RAM-tier run is evaluated streamed too: only the blocks' outside on the device
        finally:
            if disk:
                run.close()
        model, tokenizer, step = session.model, session.tokenizer, len(records)
    else:
        from zotune.models import load_model

        cfgs = resolve_configs(None, overrides, {"model": {"name": source}} if source else None, task=task)
        evaluated = make_task(cfgs["task"], None)
        model, tokenizer = load_model(cfgs["model"], log=log)
        model.to(target)
        session, step = None, None
    task_cfg, run_cfg = cfgs["task"], cfgs["run"]
    from zotune.precision import set_tf32

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
    path = Path(out) if out else (run_dir / "eval.json" if run_dir else Path("eval.json"))
    path.write_text(json.dumps(summary, indent=2) + "\n")
    what = f"run {run_dir} at step {step}" if run_dir else cfgs["model"].name
    names = METRICS[task_cfg.type]
    log(f"\n{what} on {evaluated.describe()}")
    log(f"{'split':8}{'examples':>10}" + "".join(f"{m:>13}" for m in names) + f"{'loss':>10}")
    for split, r in results.items():
        log(f"{split:8}{r['n']:>10}" + "".join(f"{r[m]:>13.3f}" for m in names) + f"{r['loss']:>10.4f}")
    log(f"{summary['seconds']:.0f}s; wrote {path}")
    return summary
