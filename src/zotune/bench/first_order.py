"""`zotune bench first-order`: the backprop reference a ZO run is measured against.

The same model, task, split, trainable tensors, batches (in the same order) and frozen prefix as
`zotune train` with the same options, trained with AdamW on exact gradients (backprop through the
trained blocks only), and evaluated on the same dev and test splits. A yardstick, not a way to
train: it keeps a gradient and two Adam moments per trained value (12 bytes more a value than a ZO
run), writes no run folder and cannot be resumed. `--lr` is AdamW's (the ZO method's lr does not
apply); `run.steps` counts its steps (one forward and one backward each).
"""

from __future__ import annotations

import contextlib
import time

import torch


def _detached(output):
    """A captured prefix output (an inference tensor) as a normal tensor that autograd may save."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_detached(o) for o in output)
    return output


def run_first_order(overrides=(), lr: float = 1e-5, weight_decay: float = 0.0, log=print) -> dict:
    from tqdm import tqdm

    from zotune.evaluation import evaluate
    from zotune.models import load_model, mask_paths, select_trainable
    from zotune.prefix import FrozenPrefix
    from zotune.resolve import resolve_configs, resolve_device
    from zotune.schedule import batch_order
    from zotune.sparse_delta import attach_deltas
    from zotune.tasks import make_task

    cfgs = resolve_configs(None, overrides)
    model_cfg, task_cfg, run_cfg = cfgs["model"], cfgs["task"], cfgs["run"]
    if run_cfg.threads:
        torch.set_num_threads(run_cfg.threads)
    device = resolve_device(run_cfg.device)
    started = time.perf_counter()
    task = make_task(task_cfg, None)
    model, tokenizer = load_model(model_cfg, log=log)
    task.bind(tokenizer)
    for mask in mask_paths(model_cfg.trainable):  # sensitive sparse ZO's deltas, as a run attaches them
        attach_deltas(model, mask)
    model.to(device).requires_grad_(False)
    params = [p for _, p in select_trainable(model, model_cfg.trainable, model_cfg.blocks_path)]
    for p in params:
        p.requires_grad_(True)
    log(f"first-order reference: AdamW lr {lr:g}, {run_cfg.steps} steps of batch {run_cfg.batch_size}, "
        f"{sum(p.numel() for p in params):,} trained values ({model_cfg.trainable})")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    prefix = FrozenPrefix.for_params(model, params, model_cfg.blocks_path, keep_bytes=run_cfg.prefix_cache_mb << 20) \
        if task.fixed_inputs else None
    eval_size = run_cfg.eval_batch_size

    before = evaluate(model, task, task.test, eval_size, device, "zero-shot test")
    metric = before["metric"]  # the task's own (accuracy, F1, exact match)
    dev = [(0, evaluate(model, task, task.dev, eval_size, device, "dev")[metric])] if task.dev else []
    order = batch_order(len(task.train), run_cfg.batch_size, run_cfg.seed,
                     task.lengths(task.train) if run_cfg.group_by_length else None)
    collated: dict[int, object] = {}
    train_started = time.perf_counter()
    losses = []
    for step in tqdm(range(1, run_cfg.steps + 1), desc="first-order", unit="step", leave=False):
        batch_id, indices = next(order)
        if batch_id not in collated:
            collated[batch_id] = task.collate([task.train[i] for i in indices])
        batch = collated[batch_id].to(device)
        if prefix is not None:  # as zotune train: the frozen blocks once per batch, kept across epochs
            prefix.capture(lambda: task.forward(model, batch), key=batch_id)
            prefix.output = _detached(prefix.output)
        with prefix.replaying() if prefix is not None else contextlib.nullcontext(), task.head(model, batch):
            loss = task.head_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if task.dev and run_cfg.eval_every and step % run_cfg.eval_every == 0:
            dev.append((step, evaluate(model, task, task.dev, eval_size, device, "dev")[metric]))
    train_seconds = time.perf_counter() - train_started
    after = evaluate(model, task, task.test, eval_size, device, "fine-tuned test")
    result = {"method": "adamw (backprop)", "lr": lr, "steps": run_cfg.steps, "trainable": model_cfg.trainable,
              "trained_values": sum(p.numel() for p in params), "task": task.describe(),
              "metric": metric, "test_before": before[metric], "test_after": after[metric],
              "test_loss_after": after["loss"],
              "dev": dev, "first_train_loss": losses[0] if losses else None,
              "final_train_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
              "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - started, 1)}
    log(f"test {metric} {before[metric]:.3f} -> {after[metric]:.3f} (loss {after['loss']:.4f}); dev "
        + ", ".join(f"{a:.3f}" for _, a in dev) + f"; {train_seconds:.0f}s of training")
    return result
