"""Compute the frozen prefix of a network once per batch and reuse it for every perturbed forward.

When the first trainable parameter sits in block k, blocks 0..k-1 give the same output for every
probe of a step. `FrozenPrefix.capture(run)` runs the model once up to block k-1 and keeps that
block's output; inside `with prefix.replaying():` blocks 0..k-1 are swapped, in their own
ModuleList, for stand-ins that return the kept output, so each probe computes only blocks k.. and
the head. The model's own forward runs unchanged: no copied forward, no patched class.

Since the prefix never changes during a run, its output for a fixed batch can also be kept across
steps (`capture(run, key=...)` with a byte budget): on a training set of fixed batches revisited
every epoch, only the first epoch pays for the frozen blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable

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
                 keep_bytes: int = 0):
        self.model, self.layers, self.k = model, layers, k
        self.output = None
        self.keep_bytes = keep_bytes
        self._kept: dict[Hashable, object] = {}
        self.kept_bytes = 0
        ids = {id(p) for p in trainable}
        # Modules owning a trainable tensor: none of them may run before block k.
        self._owners = [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]
        self._stand_ins = [_Replay(self) for _ in range(k)]

    @classmethod
    def for_params(cls, model: nn.Module, trainable: list[torch.Tensor], blocks_path: str | None = None,
                   keep_bytes: int = 0):
        """A FrozenPrefix when the first trainable parameter is past block 0, else None."""
        _, layers = find_block_list(model, blocks_path)
        ids = {id(p) for p in trainable}
        k = next((i for i, block in enumerate(layers) if any(id(p) in ids for p in block.parameters())), len(layers))
        return cls(model, layers, k, trainable, keep_bytes) if k > 0 else None

    def capture(self, run: Callable[[], object], key: Hashable | None = None) -> None:
        """Run `run()` (a forward of the model on this step's batch) only as far as block k-1.

        With a `key` naming the batch, the output is kept while the byte budget allows, and a later
        capture with the same key reuses it without running anything.
        """
        if key is not None and key in self._kept:
            self.output = self._kept[key]
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
            if self.kept_bytes + size <= self.keep_bytes:
                self._kept[key] = self.output
                self.kept_bytes += size

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

    def clear(self) -> None:
        self.output = None
        self._kept.clear()
        self.kept_bytes = 0


def _nbytes(output: object) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_nbytes(o) for o in output)
    return 0
