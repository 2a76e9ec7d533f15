"""The training loop, written out: evaluate, train with forward passes only, evaluate again.

`train(cfgs)` opens the run folder, builds the model and optimizer (`Session`), catches up with what a
resumed run already did, runs the steps (`_run_steps`: the loop itself), and finishes (the kept
weights, the final evaluation, the summary). Configs come from `zotune.resolve`, evaluation from
`zotune.evaluation`, the weights of a finished run from `zotune.weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from zotune.combinations import check as check_combinations
from zotune.config import ConfigError
from zotune.evaluation import evaluate, metric_record
from zotune.files import is_disk_full
from zotune.methods import NonFiniteLossError
from zotune.models import resolve_source
from zotune.parallel import SOLO, DivergedError, Group, text_digest, weights_digest
from zotune.precision import Masters, Precision, set_tf32
from zotune.prefix import FrozenPrefix, PrefixStore, batch_key
from zotune.resolve import SECTIONS, check_as_recorded, resolve_device
from zotune.runs import RunFolder, RunRecord, step_row
from zotune.schedule import batch_order, lr_factor
from zotune.session import Session, back_to_step
from zotune.tasks import Task, make_task
from zotune.trackers import open_trackers


class _StopOnCtrlC:
    """First Ctrl-C: finish the current step, then stop cleanly. Second Ctrl-C: abort now."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        message = "\nstopping after this step (Ctrl-C again to abort now)\n"
        try:  # a raw write: the handler may run inside a write to sys.stderr (the progress bar's), where print fails
            os.write(sys.stderr.fileno(), message.encode())
        except (OSError, ValueError):  # a stderr without a file descriptor (captured)
            print(message, end="", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


STUCK_AT = 0.5  # the share of run.steps after which a dev metric that has not beaten zero-shot is named


class _Best:
    """The best dev evaluation so far, whether the run has run out of patience (`run.patience`), and
    whether it is stuck: no better than zero-shot after `STUCK_AT` of its steps (said once)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.step: int | None = None
        self.score, self.loss = float("-inf"), float("inf")
        self.since = 0  # evaluations since the best one
        self.zero_shot: float | None = None  # the dev metric at step 0
        self.said_stuck = False

    def record(self, step: int, score: float, loss: float) -> bool:
        """Count an evaluation; True when it is a new best: a higher metric, or the same with a lower
        loss (a small dev set ties often); otherwise the earlier step stays."""
        if step == 0:
            self.zero_shot = score
        if (score, -loss) > (self.score, -self.loss):
            self.step, self.score, self.loss, self.since = step, score, loss, 0
            return True
        self.since += 1
        return False

    def out_of_patience(self) -> bool:
        return bool(self.patience) and self.since >= self.patience

    def stuck(self, step: int, total: int) -> bool:
        """True once, at the first evaluation past `STUCK_AT` of the run when none has beaten zero-shot."""
        if self.said_stuck or self.zero_shot is None or step < STUCK_AT * total or self.score > self.zero_shot:
            return False
        self.said_stuck = True
        return True


@dataclass
class _Run:
    """What every part of a training run shares: the configs, the task, the built session, the folder."""

    cfgs: dict
    task: Task
    session: Session
    run: RunFolder
    group: Group
    device: torch.device
    log: object
    best: _Best
    prefix: FrozenPrefix | None = None
    prefix_store: PrefixStore | None = None  # shared by the runs of one command (zotune.prefix.PrefixStore)

    @property
    def main(self) -> bool:
        return self.group.is_main

    @property
    def track_dev(self) -> bool:
        return bool(self.cfgs["run"].eval_every and self.task.dev)

    def is_eval_step(self, step: int) -> bool:
        run_cfg = self.cfgs["run"]
        return self.track_dev and step % run_cfg.eval_every == 0 and step < run_cfg.steps

    def evaluate(self, examples, desc: str, shared: bool = True) -> dict:
        """The task's metrics on `examples`; `shared`: each rank evaluates its share (else all of them)."""
        return evaluate(self.session.model, self.task, examples, self.cfgs["run"].eval_batch_size, self.device, desc,
                        self.group if shared else SOLO)

    def log_dev(self, step: int) -> float:
        """Evaluate on dev; a new best step's weights are kept in a protected snapshot (`run.keep=best`)."""
        dev = self.evaluate(self.task.dev, "dev")
        self.run.log({"step": step, **metric_record("dev", dev)})
        if self.best.record(step, dev[dev["metric"]], dev["loss"]) and self.cfgs["run"].keep == "best":
            self.run.protected = step  # its snapshot stays: the weights the run ends with, if nothing beats it
            self.session.snapshot(step)
        return dev[dev["metric"]]


def train(cfgs: dict, log=print, resume: bool = False, task: Task | None = None, trial: dict | None = None,
          zero_shot: dict | None = None, prefix_store: PrefixStore | None = None) -> dict:
    """Fine-tune with a ZO method and return the summary written to the run folder.

    `cfgs` maps section names to configs (`zotune.resolve.resolve_configs`); missing sections take their
    defaults. With `resume`, `run.out` is an existing run: its log is checked (a damaged tail is cut at
    the last good step), the weights are restored bit for bit, and training continues where it stopped.
    Under torchrun every rank calls this; rank 0 alone writes the run folder and prints.
    """
    cfgs = {name: cfgs.get(name) or cls() for name, cls in SECTIONS.items()}
    check_combinations(cfgs)  # again, for configs built in Python
    started = time.perf_counter()
    if cfgs["run"].threads:
        torch.set_num_threads(cfgs["run"].threads)
    device = resolve_device(cfgs["run"].device)
    group = Group.from_env(cfgs["parallel"], device)
    if not group.is_main:
        log = lambda *a, **k: None  # noqa: E731 -- rank 0 speaks for the run
    tf32 = set_tf32(device, cfgs["model"].tf32)
    if tf32:
        log(tf32)
    # Inputs are checked before the run folder exists, so a fixed command can reuse the same --out.
    resolve_source(cfgs["model"])
    task = task or make_task(cfgs["task"], None)  # its rows checked here; its tokenizer comes below
    run = _open_run(cfgs, group, resume, log)
    try:
        check_as_recorded(run.recorded_options(), cfgs, run.path)  # a resumed run is the run that was recorded
        session = Session(cfgs, run, device, log, resume, group)
        task.bind(session.tokenizer)
    except ConfigError:  # refused before step 0: a new run leaves nothing behind, a resumed one is as it was
        run.close() if resume else run.discard()
        raise
    r = _Run(cfgs, task, session, run, group, device, log, _Best(cfgs["run"].patience), prefix_store=prefix_store)
    if trial is not None and r.main:  # what `model.trainable=auto` and `method.lr=auto` tried, and why
        run.write_trial(trial)
    _introduce(r, resume)
    start, before, seconds_before = _catch_up(r, resume, zero_shot)
    outcome = _run_steps(r, start, seconds_before)
    summary = _finish(r, outcome, before, started)
    group.close()
    return summary


def _open_run(cfgs: dict, group: Group, resume: bool, log) -> RunFolder:
    """Rank 0's run folder (new, or the one to resume); the other ranks follow it and write nothing."""
    run = None
    if group.is_main:
        run = RunFolder(cfgs["run"].out, resume=resume)
        if resume:
            summary_path = run.path / "summary.json"
            done = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            logged = len(run.read_steps()[0])  # (a log that lost steps since is repaired below: they run again)
            if done.get("status") == "finished" and min(done.get("steps", 0), logged) >= cfgs["run"].steps:
                run.close()
                raise ConfigError(f"run {run.path} already finished its {done['steps']} steps; "
                                  f"train longer with `zotune resume {run.path} run.steps=N`")
    out = group.broadcast(str(run.path) if run is not None else None)  # the others follow rank 0's folder
    run = run or RunRecord(out)  # (the same name, even when it was a timestamp)
    log(f"run folder: {run.path}" + (f" ({group.world} processes: data {group.dims.data} x perturb "
                                     f"{group.dims.perturb})" if group.world > 1 else ""))
    return run


def _introduce(r: _Run, resume: bool) -> None:
    """Config and trackers written, the ranks checked against each other, what trains said once."""
    cfgs, session, log = r.cfgs, r.session, r.log
    as_dicts = {name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()}
    if r.main:  # written only now that the run starts (or continues: a longer run.steps, new defaults named)
        r.run.write_config(as_dicts)
        r.run.trackers = open_trackers(cfgs["run"].report_to, r.run.path, as_dicts)
    r.group.check_same("the model, config and seed", lambda: text_digest(  # the same on every rank, before any step
        json.dumps({k: v for k, v in as_dicts.items() if k != "run"}, sort_keys=True, default=str)
        + str(cfgs["run"].seed) + weights_digest(session.params if session.engine is None else []).hex()))
    task, params, adapter = r.task, session.params, cfgs["adapter"]
    log(f"task: {task.describe()}, {len(task.train)} train / {len(task.dev)} dev / {len(task.test)} test")
    notes = task.notes + ([f"run.batch_size={cfgs['run'].batch_size} is larger than the {len(task.train)} training "
                           f"examples: every batch is the whole training split"]
                          if cfgs["run"].batch_size > len(task.train) else [])
    for note in notes:
        log(f"note: {note}")
    n_decay = sum(p.numel() for p in params if p.dim() >= 2)
    what = adapter.describe() if adapter.kind != "none" else cfgs["model"].trainable
    log(f"trainable ({what}): {len(params)} tensors, {sum(p.numel() for p in params):,} values "
        f"({n_decay:,} in tensors with dim >= 2, the only ones that get weight decay)")
    if session.masters is not None:
        dtype = params[0].dtype
        log(Precision.resolve(dtype, dtype, streamed=False).reason +
            f": {session.masters.extra_bytes / 2**20:,.0f} MiB more")
    elif session.engine is None and cfgs["stream"].tier == "none" and Masters.needed(params):
        log(f"warning: this run was started before float32 masters: its trainable tensors stay {cfgs['model'].dtype}, "
            f"as trained (in-place moves round them by up to {torch.finfo(params[0].dtype).eps:.0e} relative every "
            f"step and smaller updates are lost); start a new run to train float32 masters")
    streamed = cfgs["stream"].tier != "none" or session.engine is not None
    # (prefix tuning feeds every block trained keys and values: no block is frozen)
    if not streamed and task.fixed_inputs and adapter.kind != "prefix":
        r.prefix = FrozenPrefix.for_params(session.model, params, cfgs["model"].blocks_path,
                                           keep_bytes=cfgs["run"].prefix_cache_mb << 20, store=r.prefix_store)
    if r.prefix is not None:
        log(f"blocks 0..{r.prefix.k - 1} are frozen: computed once per batch (kept up to "
            f"{cfgs['run'].prefix_cache_mb} MiB across epochs) and reused by every probe")


def _catch_up(r: _Run, resume: bool, zero_shot: dict | None = None) -> tuple[int, dict, float]:
    """(the first step to take, the zero-shot test result, seconds trained before): a resumed run's
    weights restored and its evaluations so far counted; a zero-shot or dev evaluation that is missing done."""
    run_cfg, run, group = r.cfgs["run"], r.run, r.group
    start, before, seconds_before = 0, zero_shot, 0.0  # (`zero_shot`: the base's test result, known already)
    if resume:
        records, problem = run.read_steps(repair=True)
        if problem:
            r.log(problem)
        start = r.session.restore(records)
        before, seconds_before = run.rewind_metrics(records, keep_dev=r.is_eval_step)
    r.session.start_streaming()
    if resume:  # the dev evaluations so far decide the best step and the patience left
        for dev_step, score, loss in run.dev_scores() if r.main else []:
            r.best.record(dev_step, score, loss)
        run.protected = r.best.step if run_cfg.keep == "best" and r.best.step is not None else -1
    # decisions from rank 0's files: every rank must take part in the same evaluations
    before, seconds_before, r.best = group.broadcast((before, seconds_before, r.best))
    if before is None:
        before = r.evaluate(r.task.test, "zero-shot test")
        run.log({"step": 0, **metric_record("test", before), "n": before["n"]})
    metric = before.get("metric", "accuracy")
    r.log(f"zero-shot test {metric} {before[metric]:.3f} (loss {before['loss']:.4f})")
    if r.track_dev:  # a run can stop between a step and its evaluation: evaluate what is missing
        last_eval = start - start % run_cfg.eval_every
        if last_eval and not r.is_eval_step(last_eval):
            last_eval -= run_cfg.eval_every
        if group.broadcast(not run.has_dev(last_eval)):
            r.log_dev(last_eval)
    return start, before, seconds_before


@dataclass
class _Outcome:
    status: str = "finished"
    step: int = 0
    error: str | None = None
    stopped_early: int | None = None
    train_seconds: float = 0.0


def _run_steps(r: _Run, start: int, seconds_before: float) -> _Outcome:
    """The loop: steps start+1.. run.steps, each logged (the checkpoint) before anything else happens."""
    run_cfg, task, model, run, group = r.cfgs["run"], r.task, r.session.model, r.run, r.group
    order = batch_order(len(task.train), run_cfg.batch_size, run_cfg.seed,
                        task.lengths(task.train) if run_cfg.group_by_length else None)
    for _ in range(start):  # the data order of the steps already taken
        next(order)
    collated: dict[int, object] = {}
    out, train_started = _Outcome(step=start), time.perf_counter()
    bar = tqdm(total=run_cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not r.main)
    with _StopOnCtrlC() as ctrl_c:
        for step in range(start + 1, run_cfg.steps + 1):
            batch_id, indices = next(order)
            rows, share = group.rows(len(indices))  # this rank's part
            if batch_id not in collated and share:  # kept on the host: device memory does not grow with the data
                collated[batch_id] = task.collate([task.train[i] for i in indices[rows]])
            batch = collated[batch_id].to(r.device) if share else None
            if r.prefix is not None and share:
                r.prefix.capture(lambda: task.forward(model, batch), key=batch_key(r.cfgs, group.rank, batch_id))
            # (a rank with no rows of this batch, e.g. parallel.data above run.batch_size, runs no forward)
            replay = r.prefix.replaying if r.prefix is not None and share else contextlib.nullcontext
            factor = lr_factor(run_cfg.lr_schedule, step, run_cfg.steps, run_cfg.warmup_steps)
            try:
                with replay(), task.head(model, batch) if share else contextlib.nullcontext():
                    # the head: once for every probe
                    probed = (r.prefix.probe_model(model, lambda m: task.forward(m, batch), r.log)
                              if r.prefix is not None and share else model)  # every block frozen: the tail
                    loss, rec = r.session.step(lambda: task.head_loss(probed, batch), share, factor)
                out.step = step
                run.append_step(step, rec, loss)  # the checkpoint: from here on, this step is never lost
                run.log(step_row(step, loss, rec, round(seconds_before + time.perf_counter() - train_started, 3)))
                if _after_step(r, step, bar):
                    out.stopped_early = step
                    break
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update()
                if _stop_requested(ctrl_c, group):
                    out.status = "interrupted"
                    break
            except (NonFiniteLossError, DivergedError, OSError) as e:
                out.status, out.error = "failed", _failure(e, step, out.step, run)
                break
    bar.close()
    if r.prefix is not None:
        r.prefix.clear()
    out.train_seconds = time.perf_counter() - train_started
    return out


def _after_step(r: _Run, step: int, bar) -> bool:
    """A logged step's evaluation, snapshot and weight check; True when the run is out of patience."""
    run_cfg = r.cfgs["run"]
    if r.is_eval_step(step):
        score = r.log_dev(step)
        if r.main:
            bar.write(f"step {step}: dev {r.cfgs['task'].metric} {score:.3f}")
        if r.best.stuck(step, run_cfg.steps):
            r.log(_stuck_hint(r.cfgs, step, score, r.best.zero_shot))
        if r.best.out_of_patience():
            if run_cfg.snapshot_every and step % run_cfg.snapshot_every:
                r.session.snapshot(step)
            return True
    if run_cfg.snapshot_every and step % run_cfg.snapshot_every == 0:
        r.session.snapshot(step)
    if r.group.dims.check_every and step % r.group.dims.check_every == 0:
        r.group.check_same(f"the weights at step {step}", r.session.weights_digest)
    return False


def _stuck_hint(cfgs: dict, step: int, score: float, zero_shot: float) -> str:
    """One line: the run is not learning, and the next things to try."""
    probe = cfgs["model"].trainable == "final-norm" and cfgs["adapter"].kind == "none"
    other = "the last blocks (--trainable last-blocks:2)" if probe else \
        "the final norm (--trainable final-norm) or a LoRA adapter (adapter.kind=lora)"
    lr = cfgs["method"].lr
    lrs = f"method.lr={lr / 3:.3g} or {lr * 3:.3g} (now {lr:g})" if lr else "a method.lr above 0"
    return (f"note: after {step} of {cfgs['run'].steps} steps dev {cfgs['task'].metric} {score:.3f} has not beaten "
            f"zero-shot ({zero_shot:.3f}): try training {other}, {lrs}, a longer run (run.steps), or another prompt "
            f"(task.template)")


def _failure(e: Exception, step: int, logged: int, run: RunFolder) -> str:
    """The one line a failed step leaves in the summary (`logged`: the last step in steps.log)."""
    if logged < step:  # the step itself failed (a non-finite loss, a lost rank): it never happened
        if isinstance(e, OSError):
            raise e
        return str(e)
    if isinstance(e, OSError):
        why = "the disk is full" if is_disk_full(e) else e.strerror
        return (f"step {step}: could not write to the run folder ({why}); everything logged so far is intact: free "
                f"space, then `zotune resume {run.path}`")
    return f"step {step}: {e}; the run folder is intact: `zotune resume {run.path}`"


def _stop_requested(ctrl_c: _StopOnCtrlC, group: Group) -> bool:
    """Ctrl-C here, or (under torchrun) on any rank: every rank stops after the same step."""
    return group.sum([float(ctrl_c.requested)])[0] > 0


def _finish(r: _Run, out: _Outcome, before: dict, started: float) -> dict:
    """The weights the run keeps, the fine-tuned test evaluation, the summary, the plot and the table."""
    run_cfg, metric, session, log = r.cfgs["run"], r.cfgs["task"].metric, r.session, r.log
    step, best = out.step, r.best
    summary = {"status": out.status, "steps": step, "before": before, "train_seconds": round(out.train_seconds, 1),
               "run": str(r.run.path)}
    if out.stopped_early is not None:
        summary["stopped_early"] = {"step": out.stopped_early, "patience": run_cfg.patience}
        log(f"stopped early at step {out.stopped_early}: {run_cfg.patience} dev evaluations without a better "
            f"{metric} than step {best.step}'s {best.score:.3f}")
    if out.status == "finished":
        if r.track_dev and out.stopped_early is None:
            r.log_dev(step)
        if run_cfg.snapshot_every and step % run_cfg.snapshot_every and out.stopped_early is None:
            session.snapshot(step)
        kept = step
        if run_cfg.keep == "best" and best.step is not None and best.step != step:
            r.session, kept = back_to_step(session, best.step, r.cfgs, r.run, r.device, r.group)
            session = r.session  # at the weights of the best dev evaluation
            log(f"keeping the zero-shot weights (step 0, run.keep=best): no dev evaluation beat its {metric} "
                f"{best.score:.3f}" if kept == 0 else
                f"keeping step {kept} of {step} (run.keep=best): the best dev {metric}, {best.score:.3f}")
        if best.step is not None:
            summary["best"] = {"step": best.step, f"dev_{metric}": best.score, "kept": run_cfg.keep == "best",
                               "zero_shot": best.step == 0}
        after = r.evaluate(r.task.test, "fine-tuned test", shared=False)
        summary["after"] = after
        summary["kept_step"] = kept
        r.run.log({"step": kept, **metric_record("test", after), "n": after["n"]})
    else:
        summary["error"] = out.error or "stopped by Ctrl-C"
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["forward_passes"] = r.cfgs["method"].forwards_in(step)
    session.close()  # streaming: every block flushed to its tier
    try:
        r.run.write_summary(summary)
        r.run.plot()
    except OSError as e:
        log(f"could not write the summary or plot ({e.strerror}); metrics.jsonl and steps.log are intact")
    r.run.close()
    _print_table(summary, log)
    return summary


def _print_table(summary: dict, log) -> None:
    before, after = summary["before"], summary.get("after")
    metric = before.get("metric", "accuracy")
    log("")
    log(f"{'':14}{metric:>12}{'loss':>10}")
    log(f"{'zero-shot':14}{before[metric]:>12.3f}{before['loss']:>10.4f}")
    if after:
        log(f"{'fine-tuned':14}{after[metric]:>12.3f}{after['loss']:>10.4f}")
        log(f"{'change':14}{after[metric] - before[metric]:>+12.3f}{after['loss'] - before['loss']:>+10.4f}")
    log(f"{summary['steps']} steps in {summary['train_seconds']:.0f}s of training, {summary['seconds']:.0f}s in all; "
        f"status {summary['status']}; run folder {summary['run']}")
    if summary.get("kept_step") not in (None, summary["steps"]):
        log(f"fine-tuned = the weights of step {summary['kept_step']} (run.keep=best)")
    if summary.get("error"):
        log(f"stopped: {summary['error']}")
