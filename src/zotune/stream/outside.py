"""Trained tensors outside a streamed model's blocks (embeddings, final norm, head): they stay on the
device, and each probe of a step must see them at its own point.

A probe's forward uses them in segments: what runs before block 0 (the embeddings: the "start"), and
what runs after the last block (final norm, head: the "end"), while the probes take turns through
the blocks in between. A tensor used in one segment only is walked in place there, probe after
probe, as the resident step walks it: no copy. A tensor used in both (embeddings tied to the head),
between the blocks, or not yet seen in a forward, is walked once at the start of the step and each
probe but the last keeps its own copy (n_probes − 1 copies: for FZOO's 9 probes, 8). Which segment
uses a tensor is seen by forward pre-hooks on the modules that own them (any forward tells: the
zero-shot evaluation, or the first step, which copies what it has not yet seen), and HF's input and
output embeddings are known by their role before any forward (a head tied to the embeddings is
both). A step that sees a tensor used in a segment it was not walked in is stopped and taken back,
and the tensor is copied from then on. What this cannot see: a tensor used by another module than
its own, outside HF's embedding roles (not HF's way; tested for llama, qwen2, opt, gpt2, gpt_neox).
Every way gives the same values: the walk's moves are the same, in the same order, from the same θ.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

START, MIDDLE, END = "start", "middle", "end"


class Outside:
    """The trained tensors outside the blocks: `tensors` (tensor index, the tensor or its float32 master),
    `compute` (index -> the 16-bit model tensor that reads its master's rounding)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList):
        self.model, self.blocks = model, len(layers)
        self.tensors: list[tuple[int, torch.Tensor]] = []
        self.compute: dict[int, nn.Parameter] = {}
        self.used: dict[int, set[str]] = {}  # id of a model parameter -> the segments of a forward seen using it
        self.planned: dict[int, str] = {}  # during a step: id -> the segment it is walked in place in
        self._ids: dict[int, int] = {}  # tensor index -> id of its model parameter
        self._local = threading.local()  # .segment of the forward running in this thread
        # A forward starts in the model, or in the module that runs the blocks (a closure may call it alone)
        starts = [model, *(m for m in model.modules() if any(c is layers for c in m.children()))]
        self._hooks = [m.register_forward_pre_hook(lambda m, a: self.at(START)) for m in starts]
        in_blocks = {id(p) for p in layers.parameters()}
        for module in model.modules():  # every module owning a parameter outside the blocks: which segment uses it
            mine = [id(p) for p in module.parameters(recurse=False) if id(p) not in in_blocks]
            if mine:
                self._hooks.append(module.register_forward_pre_hook(lambda m, a, mine=mine: self._seen(mine)))
        for segment, get in [(START, model.get_input_embeddings), (END, model.get_output_embeddings)]:
            module = _or_none(get)  # known by their role before any forward
            for p in module.parameters(recurse=False) if module is not None else ():
                self.used.setdefault(id(p), set()).add(segment)

    def attach(self, opt, in_blocks: set[int], masters: dict[int, torch.Tensor] | None) -> None:
        """`opt`'s trained tensors that are not in a block (`in_blocks`: ids); a 16-bit one (a final norm,
        tied embeddings) trains a float32 master on the device, as block tensors do on the tier."""
        self.tensors, self.compute, self._ids = [], {}, {}
        for i, p in opt.indexed():
            if id(p) in in_blocks:
                continue
            self._ids[i] = id(p)
            if p.dtype == torch.float32:
                self.tensors.append((i, p))
            else:
                self.compute[i] = p
                start = masters[i] if masters and i in masters else p.data
                self.tensors.append((i, start.detach().to(p.device, torch.float32, copy=True)))

    def at(self, segment: str) -> None:
        """The forward running in this thread has reached `segment` (the engine's block hooks say so)."""
        self._local.segment = segment

    def _seen(self, ids: list[int]) -> None:
        segment = getattr(self._local, "segment", MIDDLE)
        for pid in ids:
            self.used.setdefault(pid, set()).add(segment)
            planned = self.planned.get(pid)
            if planned is not None and planned != segment:  # its values here are another probe's: stop the step
                raise RuntimeError(f"zotune: a trained tensor outside the blocks, walked in place {planned} of the "
                                   f"blocks, is used {segment} of them in this forward; the step is taken back. "
                                   f"Run the step again (it is now copied per probe)")

    def split(self) -> tuple[list, list, list]:
        """(walked in place before block 0, walked in place after the last block, copied per probe)."""
        start, end, copied = [], [], []
        for i, t in self.tensors:
            used = self.used.get(self._ids[i]) if self.blocks else None  # (no blocks: no segments to tell apart)
            (start if used == {START} else end if used == {END} else copied).append((i, t))
        self.planned = {**{self._ids[i]: START for i, _ in start}, **{self._ids[i]: END for i, _ in end}}
        return start, end, copied

    def refresh(self, pairs: list[tuple[int, torch.Tensor]]) -> None:
        """After an in-place move: a 16-bit model tensor reads its master's new rounding."""
        for i, t in pairs:
            if i in self.compute:
                self.compute[i].data = t.detach().to(self.compute[i].dtype)

    def sync(self) -> None:
        """16-bit model tensors rounded from their float32 masters (after a step or a restore)."""
        for i, master in self.tensors:
            if i in self.compute:
                self.compute[i].data = master.detach().to(self.compute[i].dtype)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _or_none(get):
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None
