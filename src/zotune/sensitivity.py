"""`zotune sensitivity`: the mask of sensitive weights for sensitive sparse ZO (`zotune.sparse_delta`).

A weight's sensitivity is its squared gradient of the task loss summed over training rows (a
diagonal Fisher estimate); the mask keeps the `density` share of all block linear weights with the
largest, over the whole model (or over the last K blocks: `--last-blocks K`, so that in training the
blocks before them stay a frozen prefix, computed once per batch, and each probe runs only K blocks).
Backprop is allowed here since it runs once, and it runs block by block: one forward keeps each
block's input for every batch (B x T x H values a block and batch, in host memory), then, from the
last block down, each block is run again with gradients, for every batch, from its kept input and the
gradient at its output, so that only one block's gradients are ever on the device (and the running
top entries in host memory). It runs on `run.device` (a GPU when there is one), the model resident
there or, from a stream folder, a block at a time. The model's own forward and blocks run, found by
structure (`find_block_list`), with the arguments they were called with (captured by a pre-hook),
and the loss at the last block's output comes from the model's forward with every block replayed
(`FrozenPrefix`): no forward is copied.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.models import find_block_list
from zotune.prefix import FrozenPrefix
from zotune.resolve import resolve_device

HOST = torch.device("cpu")  # where the kept inputs and the running top wait: the device holds one block's work


def _block_calls(model: nn.Module, blocks, first: int, task, batches, device) \
        -> tuple[list[list[tuple]], list[torch.Tensor]]:
    """(for each block from `first` on, for each batch: the (args, kwargs) it was called with, its input
    detached, in host memory; the last block's output for each batch, on `device`), from one no-grad
    forward of each batch."""
    calls: list[list[tuple]] = [[] for _ in blocks]
    last: list[torch.Tensor] = []
    handles = [blocks[j].register_forward_pre_hook(
        lambda m, args, kwargs, j=j: calls[j].append((_moved(args, HOST), _moved(kwargs, HOST))), with_kwargs=True)
        for j in range(first, len(blocks))]
    handles.append(blocks[-1].register_forward_hook(
        lambda m, args, out: last.append((out[0] if isinstance(out, (tuple, list)) else out).detach())))
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                with task.head(model, batch):  # (the head computes only what the loss reads)
                    task.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return calls, last


def _moved(x, device):
    """`x` (a tensor, or tuples and dicts of them) detached and on `device`."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    if isinstance(x, tuple):
        return tuple(_moved(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _moved(v, device) for k, v in x.items()}
    return x


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _output_grads(model, layers, task, batches, last_outputs) -> list[torch.Tensor]:
    """d loss / d (the last block's output), per batch: the model's forward with every block replayed."""
    prefix = FrozenPrefix(model, layers, len(layers), [])
    grads = []
    for batch, out in zip(batches, last_outputs):
        leaf = out.detach().requires_grad_(True)
        prefix.output = leaf
        with torch.enable_grad(), prefix.replaying():
            task.loss(model, batch.to(out.device)).backward()
        grads.append(leaf.grad.to(HOST))
    return grads


def squared_gradients(model: nn.Module, task, batches, density: float, blocks_path: str | None = None,
                      log=print, last_blocks: int | None = None, hold=None) -> tuple[dict[str, torch.Tensor], int]:
    """(weight name -> flat indices of its entries in the top `density` of all block linear weights by summed
    squared gradient, the number of candidate weights). `last_blocks`: only the last K blocks' linears are
    candidates (the blocks before them stay a frozen prefix in training). `hold(j)`: a context in which
    block j's weights are present (a streamed model's `StreamEngine.holding`); resident, they always are."""
    path, blocks = find_block_list(model, blocks_path)
    if last_blocks is not None and not 1 <= last_blocks <= len(blocks):
        raise ConfigError(f"--last-blocks {last_blocks}: the model has {len(blocks)} blocks; give 1 to {len(blocks)}")
    first = len(blocks) - (last_blocks or len(blocks))
    device = next(model.parameters()).device  # (a streamed model's stand-ins are on its device too)
    calls, last = _block_calls(model, blocks, first, task, batches, device)
    grads = _output_grads(model, blocks, task, batches, last)
    del last
    linears = [[(f"{path}.{j}.{n}.weight", m.weight) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
               if j >= first else [] for j, block in enumerate(blocks)]
    total = sum(w.numel() for block in linears for _, w in block)
    keep = max(1, round(density * total))
    best_scores, best_ids = torch.empty(0), torch.empty(0, dtype=torch.int64)
    spans: dict[str, tuple[int, int]] = {}  # weight name -> (its first global index, its size)
    start = 0
    for j in reversed(range(first, len(blocks))):
        with hold(j) if hold is not None else contextlib.nullcontext():
            scores, grads = _block_scores(blocks[j], linears[j], calls[j], grads)
        for (name, weight), score in zip(linears[j], scores):
            spans[name] = (start, weight.numel())
            top = score.view(-1).topk(min(keep, score.numel()))
            best_scores = torch.cat([best_scores, top.values.to(HOST)])
            best_ids = torch.cat([best_ids, top.indices.to(HOST) + start])
            start += weight.numel()
            if len(best_scores) > keep:  # the running global top: one block's scores held at a time
                kept = best_scores.topk(keep)
                best_scores, best_ids = kept.values, best_ids[kept.indices]
        log(f"sensitivity: block {j} done")
    return _by_tensor(best_ids, spans), total


def _run(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _block_scores(block, linears, calls, out_grads) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(summed squared gradient of each linear weight of `block`, on its device; d loss / d its input per
    batch, in host memory)."""
    weights = [w for _, w in linears]
    device = weights[0].device if weights else next(block.parameters()).device
    scores = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    in_grads = []
    for w in weights:
        w.requires_grad_(True)
    try:
        for (args, kwargs), g in zip(calls, out_grads):
            args, kwargs = _moved(args, device), _moved(kwargs, device)
            hidden = _hidden(args, kwargs).requires_grad_(True)
            with torch.enable_grad():
                out = _run(block, *_with_hidden(args, kwargs, hidden))
                got = torch.autograd.grad(out, [hidden, *weights], g.to(device), allow_unused=True)
            in_grads.append(got[0].to(HOST))
            for score, w_grad in zip(scores, got[1:]):
                if w_grad is not None:
                    score.add_(w_grad.float().square())
    finally:
        for w in weights:
            w.requires_grad_(False)
    return scores, in_grads


def _by_tensor(ids: torch.Tensor, spans: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, (start, size) in spans.items():
        mine = ids[(ids >= start) & (ids < start + size)] - start
        if len(mine):
            out[name] = mine.sort().values
    return out


def make_mask(cfgs: dict, out, density: float, rows: int, batch_size: int, log=print,
              last_blocks: int | None = None) -> dict:
    """Measure and write the mask of `cfgs`' model on its task's first `rows` training rows (of the last
    `last_blocks` blocks' linears, or all); returns how."""
    from zotune.sparse_delta import save_mask
    from zotune.tasks import make_task

    if not 0 < density < 1:
        raise ConfigError(f"--density {density}: give the share of weights that train, between 0 and 1 (e.g. 0.001)")
    started = time.perf_counter()
    device = resolve_device(cfgs["run"].device)
    model, tokenizer, engine = _open_model(cfgs["model"], device, log)
    task = make_task(cfgs["task"], tokenizer)
    rows = min(rows, len(task.train))
    if rows < 1:
        raise ConfigError("zotune sensitivity needs training rows: give a task with a training split")
    batches = [task.collate(task.train[i:i + batch_size]) for i in range(0, rows, batch_size)]
    try:
        indices, total = squared_gradients(model, task, batches, density, cfgs["model"].blocks_path, log, last_blocks,
                                           engine.holding if engine is not None else None)
    finally:
        if engine is not None:
            engine.close()
    kept = sum(len(v) for v in indices.values())
    how = {"criterion": "squared gradient of the task loss, summed over rows (diagonal Fisher)",
           "model": cfgs["model"].name, "task": cfgs["task"].name or cfgs["task"].data,
           "template": cfgs["task"].template, "rows": rows, "batch_size": batch_size, "density": density,
           "blocks": f"the last {last_blocks}" if last_blocks else "all", "entries": kept, "of": total,
           "tensors": len(indices), "seconds": round(time.perf_counter() - started, 1), "device": str(device)}
    partial = out.with_name(out.name + ".partial")  # a stopped command leaves no half-written mask at `out`
    save_mask(partial, indices, how)
    os.replace(partial, out)
    log(f"wrote {out}: {kept:,} of {total:,} block linear weights ({kept / total:.3%}) in {len(indices)} tensors, from "
        f"{rows} training rows in {how['seconds']:.0f}s on {device}; train them with model.trainable=sensitive:{out}")
    return how


def _open_model(model_cfg, device: torch.device, log):
    """(model, tokenizer, its StreamEngine or None) on `device`: a stream folder streams, a block at a time,
    so the mask is measured wherever training fits; any other model loads whole."""
    from zotune.models import load_model
    from zotune.quant import QWEIGHT_KIND
    from zotune.stream import folder_tokenizer, is_stream_folder, load_streamed

    if not is_stream_folder(model_cfg.name):
        model, tokenizer = load_model(model_cfg, log=log)
        return model.to(device), tokenizer, None
    model, engine = load_streamed(model_cfg.name, device, model_cfg.dtype, log=log)
    if any(spec.dtype in QWEIGHT_KIND for specs in engine.tier.specs for spec in specs):
        engine.close()
        raise ConfigError(f"{model_cfg.name} holds quantized blocks: their weights have no gradient to measure; "
                          f"measure the mask on the float model (or a float stream folder) and train it on this one")
    return model, folder_tokenizer(model_cfg.name), engine
