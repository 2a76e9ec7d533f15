"""Compute the frozen prefix of a network once per batch and reuse it for every perturbed forward.

When the first trainable parameter sits in block k, blocks 0..k-1 give the same output for every
probe of a step. `FrozenPrefix.capture(run)` runs the model once up to block k-1 and keeps that
block's output; inside `with prefix.replaying():` blocks 0..k-1 are swapped, in their own
ModuleList, for stand-ins that return the kept output, so each probe computes only blocks k.. and
the head. The model's own forward runs unchanged: no copied forward, no patched class.

Since the prefix never changes during a run, its output for a fixed batch can also be kept across
steps (`capture(run, key=...)` with a byte budget): on a training set of fixed batches revisited
every epoch, only the first epoch pays for the frozen blocks.

When every block is frozen (a probe of the final norm or the head), even the replayed forward is
mostly waste: embeddings, rotary tables and attention masks are rebuilt for each probe around
blocks that compute nothing. `probe_model` then hands the probes a stand-in for the model that runs
only the modules that follow the blocks (the final norm, the head), by their names in the model,
on the kept output. Which modules those are is found by structure, from one recorded forward, and
the stand-in is used only if it gives that forward's logits bit for bit; otherwise the model is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Hashable
from types import SimpleNamespace

import torch
from torch import nn

from zotune.models import find_block_list


class _Captured(Exception):
    """Raised from a hook to stop the capture forward once the prefix output is known."""


class _Replay(nn.Module):
    def __init__(self, prefix: FrozenPrefix):
        super().__init__()
        self._prefix = prefix

    def forward(self, *args, **kwargs):
        return self._prefix.output


class FrozenPrefix:
    """Caches the output of the last frozen block in front of the first trainable one."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, k: int, trainable: list[torch.Tensor],
                 keep_bytes: int = 0, store: PrefixStore | None = None):
        self.model, self.layers, self.k = model, layers, k
        self.output = None
        self.keep_bytes = keep_bytes
        self.store = store if store is not None else PrefixStore()
        ids = {id(p) for p in trainable}
        # Modules owning a trainable tensor: none of them may run before block k.
        self._owners = [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]
        self._stand_ins = [_Replay(self) for _ in range(k)]
        self._tail: _Tail | bool | None = None  # None: not looked for yet; False: the model's own forward
        self.tail_note = ""

    @classmethod
    def for_params(cls, model: nn.Module, trainable: list[torch.Tensor], blocks_path: str | None = None,
                   keep_bytes: int = 0, store: PrefixStore | None = None):
        """A FrozenPrefix when the first trainable parameter is past block 0, else None."""
        _, layers = find_block_list(model, blocks_path)
        ids = {id(p) for p in trainable}
        k = next((i for i, block in enumerate(layers) if any(id(p) in ids for p in block.parameters())), len(layers))
        return cls(model, layers, k, trainable, keep_bytes, store) if k > 0 else None

    def capture(self, run: Callable[[], object], key: Hashable | None = None) -> None:
        """Run `run()` (a forward of the model on this step's batch) only as far as block k-1.

        With a `key` naming the batch, the output is kept while the byte budget allows, and a later
        capture with the same key reuses it without running anything.
        """
        if key is not None and (self.k, key) in self.store.kept:
            self.output = self.store.kept[self.k, key]
            return
        early: list[nn.Module] = []

        def note_use(module, args, output):  # a trainable module ran before the prefix ended
            early.append(module)

        def stop(module, args, output):
            self.output = output
            raise _Captured

        handles = [m.register_forward_hook(note_use) for m in self._owners]
        handles.append(self.layers[self.k - 1].register_forward_hook(stop))
        try:
            with torch.inference_mode():
                run()
        except _Captured:
            pass
        else:
            raise RuntimeError("the model never ran its last frozen block; cannot reuse a frozen prefix")
        finally:
            for h in handles:
                h.remove()
        if early:
            name = type(early[0]).__name__
            raise RuntimeError(f"a trainable {name} runs before block {self.k}; the prefix is not frozen")
        if key is not None:
            size = _nbytes(self.output)
            if self.store.bytes + size <= self.keep_bytes:
                self.store.kept[self.k, key] = self.output
                self.store.bytes += size

    @contextlib.contextmanager
    def replaying(self):
        """Inside, blocks 0..k-1 return the captured output instead of computing it."""
        if self.output is None:
            raise RuntimeError("FrozenPrefix.replaying() before capture()")
        originals = [self.layers[i] for i in range(self.k)]
        for i, stand_in in enumerate(self._stand_ins):
            self.layers[i] = stand_in
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                self.layers[i] = block

    def probe_model(self, model: nn.Module, forward: Callable[[object], object], log=None):
        """What each probe's forward runs on, inside `replaying()` and the task's head: the tail alone
        when every block is frozen and the modules after the blocks are a plain chain, else `model`.
        `forward(m)` is the task's forward of this batch on m (what the capture ran). The first call
        finds the chain (one forward of `model`, recorded) and keeps it only if the tail gives the
        same logits bit for bit (the task's objective, maybe a user's function, is not called);
        `log` hears what was found."""
        if self.k < len(self.layers):
            return model
        if self._tail is None:
            self._tail, self.tail_note = self._find_tail(model, forward)
            if log is not None:
                log(self.tail_note)
        return self._tail or model

    def _find_tail(self, model: nn.Module, forward) -> tuple[_Tail | bool, str]:
        inside = {id(m) for m in self.layers.modules()}
        names = {id(m): n for n, m in model.named_modules()}
        after, chain = [False], []

        def blocks_done(module, args, output):
            after[0] = True
            chain.clear()

        def ran(module, args, output):
            if after[0]:
                chain.append(names[id(module)])

        leaves = [m for m in model.modules() if id(m) not in inside and next(m.children(), None) is None]
        handles = [m.register_forward_hook(ran) for m in leaves]
        handles.append(self.layers[-1].register_forward_hook(blocks_done))
        try:
            with torch.inference_mode():
                full = forward(model).logits
        finally:
            for h in handles:
                h.remove()
        if not chain:
            return False, "no module runs after the blocks: probes run the whole forward"
        tail = _Tail(model, chain, self)
        try:
            with torch.inference_mode():
                same = torch.equal(forward(tail).logits, full)
        except (AttributeError, TypeError, RuntimeError, IndexError, ValueError) as e:  # not a plain chain
            return False, f"the modules after the blocks are not a plain chain ({type(e).__name__}): whole forwards"
        if not same:
            return False, f"{' -> '.join(chain)} alone differs from the forward: probes run the whole forward"
        return tail, f"every block is frozen: probes run only {' -> '.join(chain)}"

    def clear(self) -> None:
        self.output = None
        if not self.store.shared:
            self.store.clear()

    @property
    def kept_bytes(self) -> int:
        return self.store.bytes


class PrefixStore:
    """Frozen-prefix outputs kept by (first trainable block, batch key). `shared`: one store serves every
    run of one command on one model and task (the trial's candidates, the lr search's, then the run),
    since each starts from the base and leaves the blocks before its first trainable one untouched:
    a batch's prefix computed by one of them is the same bits for the others. The batch key must then
    name everything that decides the batch (seed, batch size, order), as the training loop's does."""

    def __init__(self, shared: bool = False):
        self.kept: dict[tuple[int, Hashable], object] = {}
        self.bytes, self.shared = 0, shared

    def clear(self) -> None:
        self.kept.clear()
        self.bytes = 0


class _Tail:
    """Stands in for the model in a probe's forward: the modules after the blocks, looked up by name at
    each call (the task's head may swap the LM head for the step), applied in turn to the kept output."""

    def __init__(self, model: nn.Module, names: list[str], prefix: FrozenPrefix):
        self.model, self.names, self.prefix = model, names, prefix

    def __call__(self, **inputs) -> SimpleNamespace:
        x = self.prefix.output
        x = x[0] if isinstance(x, (tuple, list)) else x
        for name in self.names:
            x = self.model.get_submodule(name)(x)
        return SimpleNamespace(logits=x)

    def __getattr__(self, name):  # what a task asks of the model besides calling it (its config, its head)
        return getattr(self.model, name)


def batch_key(cfgs: dict, rank: int, batch_id: int) -> tuple:
    """What decides a training batch's frozen prefix: the base model, the batches' order and size, the batch."""
    model = {k: v for k, v in dataclasses.asdict(cfgs["model"]).items() if k != "trainable"}
    run = cfgs["run"]
    return repr(sorted(model.items())), run.seed, run.batch_size, run.group_by_length, rank, batch_id


def _nbytes(output: object) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_nbytes(o) for o in output)
    return 0
