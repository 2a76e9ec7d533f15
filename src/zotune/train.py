"""The training loop, written out: evaluate, train with forward passes only, evaluate again."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time

import torch
from tqdm.auto import tqdm

from zotune.methods import MethodConfig, NonFiniteLossError, make_optimizer
from zotune.models import ModelConfig, load_model, select_trainable
from zotune.prefix import FrozenPrefix
from zotune.runs import RunConfig, RunFolder
from zotune.tasks import Batch, ClassificationTask, TaskConfig, load_examples


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cpu" and not getattr(torch, device.type).is_available():
        from zotune.config import ConfigError
        raise ConfigError(f"run.device={name!r} is not available on this machine; use run.device=cpu")
    return device


@torch.inference_mode()
def evaluate(model, task: ClassificationTask, examples, batch_size: int, device, desc: str = "eval") -> dict:
    """Accuracy and mean loss, batched and grouped by length, with a progress bar."""
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    with tqdm(total=len(examples), desc=desc, unit="ex", leave=False, file=sys.stderr) as bar:
        for batch in task.batches(examples, batch_size, by_length=True):
            batch = batch.to(device)
            logits = task.class_logits(model, batch)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(1) == batch.labels).sum())
            n += len(batch)
            bar.update(len(batch))
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}


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
        print("\nstopping after this step (Ctrl-C again to abort now)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _batches(n_examples: int, batch_size: int, seed: int):
    """(batch id, example indices) forever: batches are fixed once, their order reshuffled every epoch.

    Fixed batches let the frozen prefix of each batch be computed once and kept across epochs.
    """
    gen = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n_examples, generator=gen).tolist()
    batches = [shuffled[i: i + batch_size] for i in range(0, n_examples, batch_size)]
    while True:
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield b, batches[b]


def train(model_cfg: ModelConfig, task_cfg: TaskConfig, method_cfg: MethodConfig, run_cfg: RunConfig,
          log=print) -> dict:
    """Fine-tune with a ZO method and return the summary written to the run folder."""
    started = time.perf_counter()
    if run_cfg.threads:
        torch.set_num_threads(run_cfg.threads)
    device = resolve_device(run_cfg.device)
    run = RunFolder(run_cfg.out)
    run.write_config({name: dataclasses.asdict(cfg) for name, cfg in
                      (("model", model_cfg), ("task", task_cfg), ("method", method_cfg), ("run", run_cfg))})
    log(f"run folder: {run.path}")

    examples = load_examples(task_cfg.data, task_cfg.text_column, task_cfg.label_column)  # fail fast
    model, tokenizer = load_model(model_cfg, log=log)
    model.to(device)
    task = ClassificationTask(task_cfg, tokenizer, examples)
    log(f"task: {task_cfg.data}, {len(task.train)} train / {len(task.dev)} dev / {len(task.test)} test, "
        f"template {task_cfg.template!r}, verbalizer {task_cfg.verbalizer}")
    named = select_trainable(model, model_cfg.trainable, model_cfg.blocks_path)
    params = [p for _, p in named]
    n_decay = sum(p.numel() for p in params if p.dim() >= 2)
    log(f"trainable ({model_cfg.trainable}): {len(params)} tensors, {sum(p.numel() for p in params):,} values "
        f"({n_decay:,} in tensors with dim >= 2, the only ones that get weight decay)")
    opt = make_optimizer(method_cfg.name, params, seed=run_cfg.seed,
                         **{k: v for k, v in dataclasses.asdict(method_cfg).items() if k != "name"})
    prefix = FrozenPrefix.for_params(model, params, model_cfg.blocks_path, keep_bytes=run_cfg.prefix_cache_mb << 20)
    if prefix is not None:
        log(f"blocks 0..{prefix.k - 1} are frozen: computed once per batch (kept up to {run_cfg.prefix_cache_mb} MiB "
            f"across epochs) and reused by every probe")

    before = evaluate(model, task, task.test, run_cfg.eval_batch_size, device, "zero-shot test")
    log(f"zero-shot test accuracy {before['accuracy']:.3f} (loss {before['loss']:.4f})")
    run.log({"step": 0, "test_accuracy": before["accuracy"], "test_loss": before["loss"]})
    track_dev = bool(run_cfg.eval_every and task.dev)

    def log_dev(step: int) -> float:
        dev = evaluate(model, task, task.dev, run_cfg.eval_batch_size, device, "dev")
        run.log({"step": step, "dev_accuracy": dev["accuracy"], "dev_loss": dev["loss"]})
        return dev["accuracy"]

    if track_dev:
        log_dev(0)

    order = _batches(len(task.train), run_cfg.batch_size, run_cfg.seed)
    collated: dict[int, Batch] = {}
    status, error, step = "finished", None, 0
    train_started = time.perf_counter()
    bar = tqdm(total=run_cfg.steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    with _StopOnCtrlC() as ctrl_c:
        for step in range(1, run_cfg.steps + 1):
            batch_id, indices = next(order)
            if batch_id not in collated:
                collated[batch_id] = task.collate([task.train[i] for i in indices]).to(device)
            batch = collated[batch_id]
            if prefix is not None:
                prefix.capture(lambda: task.class_logits(model, batch), key=batch_id)
            replay = prefix.replaying if prefix is not None else contextlib.nullcontext

            def closure():
                with replay():
                    return task.loss(model, batch)

            try:
                loss = float(opt.step(closure))
            except NonFiniteLossError as e:
                status, error = "failed", str(e)
                step -= 1
                break
            rec = opt.last
            run.log({"step": step, "loss": loss, "grads": rec.grads, "seed": rec.seed, "lr": rec.lrs[0],
                     "seconds": round(time.perf_counter() - train_started, 3)})
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update()
            if track_dev and step % run_cfg.eval_every == 0 and step < run_cfg.steps:
                bar.write(f"step {step}: dev accuracy {log_dev(step):.3f}")
            if ctrl_c.requested:
                status = "interrupted"
                break
    bar.close()
    if prefix is not None:
        prefix.clear()
    train_seconds = time.perf_counter() - train_started

    summary = {"status": status, "steps": step, "before": before, "train_seconds": round(train_seconds, 1),
               "run": str(run.path)}
    if status == "finished":
        after = evaluate(model, task, task.test, run_cfg.eval_batch_size, device, "fine-tuned test")
        summary["after"] = after
        if track_dev:
            log_dev(step)
        run.log({"step": step, "test_accuracy": after["accuracy"], "test_loss": after["loss"]})
    else:
        summary["error"] = error or "stopped by Ctrl-C"
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["forward_passes"] = step * method_cfg.forwards_per_step
    run.write_summary(summary)
    run.close()
    run.plot()
    _print_table(summary, log)
    return summary


def _print_table(summary: dict, log) -> None:
    before, after = summary["before"], summary.get("after")
    log("")
    log(f"{'':14}{'accuracy':>10}{'loss':>10}")
    log(f"{'zero-shot':14}{before['accuracy']:>10.3f}{before['loss']:>10.4f}")
    if after:
        log(f"{'fine-tuned':14}{after['accuracy']:>10.3f}{after['loss']:>10.4f}")
        log(f"{'change':14}{after['accuracy'] - before['accuracy']:>+10.3f}{after['loss'] - before['loss']:>+10.4f}")
    log(f"{summary['steps']} steps in {summary['train_seconds']:.0f}s of training, {summary['seconds']:.0f}s in all; "
        f"status {summary['status']}; run folder {summary['run']}")
    if summary.get("error"):
        log(f"stopped: {summary['error']}")
