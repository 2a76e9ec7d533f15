"""The optimizer state that travels with a streamed block (momentum, Adam's moments, HiZOO's Hessian, ...).

While a block is on the device its state is in `opt.tensor_state`; while it is away, in host memory
(RAM tier) or in the block's slot on disk (a durable tier), written and made current with its weights.
"""

from __future__ import annotations

import torch


def keeps_state(opt) -> bool:
    """Whether `opt` keeps per-tensor state that must travel with a streamed block."""
    return bool(opt.state_floats() or getattr(opt, "replays_from_base", False))


def moved(state: dict, device: torch.device) -> dict:
    """An optimizer state dict with its tensors on `device` (the same tensors when already there)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}


def flat_state(opt_state: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors of a block's optimizer state as `<tensor name>::<key>` (the disk tier's keys)."""
    return {f"{n}::{k}": v for n, entries in opt_state.items() for k, v in entries.items() if torch.is_tensor(v)}


def unflat_state(opt_state: dict[str, dict], moved: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {n: {k: moved.get(f"{n}::{k}", v) for k, v in entries.items()} for n, entries in opt_state.items()}


class Carry:
    """Where each trained tensor's optimizer state is while its block is away, and its way back.

    `trainable[j]`: block j's (tensor index, name) pairs. With a method that keeps state and a durable
    tier, the state is written into the block's slot with its weights (`on_tier`); otherwise it waits
    in host memory (`away`, by tensor index) until its block is fetched again.
    """

    def __init__(self, tier, trainable: list[list[tuple[int, str]]]):
        self.tier, self.trainable = tier, trainable
        self.away: dict[int, dict] = {}
        self.on_tier = False

    def start(self, opt, resident) -> None:
        """`opt` takes over: the state it holds already (a resumed run) goes away with its blocks."""
        self.on_tier = self.tier.durable and keeps_state(opt)
        for j in range(len(self.trainable)):
            if j not in resident:
                for i, _ in self.trainable[j]:
                    if i in opt.tensor_state:
                        self.away[i] = moved(opt.tensor_state.pop(i), torch.device("cpu"))

    def fetch(self, j: int) -> dict[str, dict]:
        """Block j's state by tensor name, in the fetch worker (after its write-back: the
        engine orders them)."""
        if self.on_tier and self.trainable[j]:
            return self.tier.read_opt_state(j)
        return {n: self.away.pop(i) for i, n in self.trainable[j] if i in self.away}

    def arrive(self, j: int, opt, fetched: dict[str, dict], device: torch.device) -> bool:
        """Into `opt.tensor_state`; True when the tier must receive state handed over before streaming."""
        handed = False
        for i, n in self.trainable[j]:
            if i in self.away:
                opt.tensor_state[i] = moved(self.away.pop(i), device)
                handed = self.on_tier
            elif n in fetched:
                opt.tensor_state[i] = fetched[n]
        return handed

    def leave(self, j: int, opt) -> dict[str, dict]:
        """Block j's state leaves `opt` with the block."""
        if opt is None:
            return {}
        return {n: opt.tensor_state.pop(i) for i, n in self.trainable[j] if i in opt.tensor_state}

    def stored(self, j: int, host_state: dict[str, dict]) -> dict[str, dict] | None:
        """After its copy to the host: what the tier writes with the weights, or None (kept `away`)."""
        if self.on_tier:
            return host_state
        index = {n: i for i, n in self.trainable[j]}
        for n, entries in host_state.items():
            self.away[index[n]] = entries
        return None

    def drop(self, j: int, opt) -> None:
        """A block abandoned on a durable tier: the tier's copy of its state is the current one."""
        if self.on_tier:
            for i, _ in self.trainable[j]:
                opt.tensor_state.pop(i, None)
