"""Blocks in host memory between visits (`RamTier`): fast, and gone with the process."""

from __future__ import annotations

import torch

from zotune.stream.tier import BlockState
from zotune.stream.transfers import host_views


class RamTier:
    """Blocks in host memory (page-locked when the compute device is a GPU, so copies run async).

    `blocks[j]` maps parameter name -> stored tensor. On a CPU compute device with matching dtypes
    the stored tensors are computed on directly: fetch and write-back cost nothing. Every rank of a
    distributed run holds its own copy; the optimizer state of an away block stays with the engine.
    """

    durable = False

    def __init__(self, blocks: list[dict[str, torch.Tensor]], pinned=None, at_step: int = 0):
        """`pinned`: the accelerator whose exact page-locked buffers hold the blocks (None: plain memory)."""
        self.blocks, self.pinned = blocks, pinned
        self.states = [BlockState(at_step) for _ in blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def add_masters(self, j: int, names: list[str]) -> None:
        """Float32 masters of block j's 16-bit trained tensors (one exact page-locked slab when the tier pins)."""
        low = [n for n in names if self.blocks[j][n].dtype != torch.float32]
        specs = [(n, self.blocks[j][n].shape, torch.float32) for n in low]
        masters = host_views(specs, self.pinned) if self.pinned and low else {
            n: torch.empty(shape, dtype=dtype) for n, shape, dtype in specs}
        for n in low:
            self.blocks[j][n] = masters[n].copy_(self.blocks[j][n])

    def set_master(self, j: int, name: str, value: torch.Tensor) -> None:
        """The float32 master of a trained tensor of block j, set to `value` (after `add_masters`)."""
        self.blocks[j][name].copy_(value)

    def read(self, j: int, pool=None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """(block j's stored tensors, no pool buffers): nothing is copied."""
        return dict(self.blocks[j]), []

    def values(self, j: int, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self.blocks[j][n] for n in names}

    def host_storage(self, j: int) -> dict[str, torch.Tensor]:
        """Where a write-back of block j may copy its tensors directly: their stored tensors."""
        return self.blocks[j]

    def write(self, j: int, tensors: dict[str, torch.Tensor], state: BlockState, opt_state=None) -> None:
        """Block j's trained tensors back in place (the optimizer state stays in the engine's hands)."""
        for name, t in tensors.items():
            stored = self.blocks[j][name]
            if t.data_ptr() != stored.data_ptr():
                stored.copy_(t, non_blocking=False)
        self.states[j] = state

    def read_opt_state(self, j: int) -> dict[str, dict]:
        return {}

    def get_state(self, j: int) -> BlockState:
        return self.states[j]

    def previous(self, j: int) -> None:
        return None  # one copy only: a failed step's moves are taken back instead

    def go_back(self, j: int) -> None:
        raise RuntimeError("a RamTier keeps no earlier copy of a block")

    def join(self, group) -> None:
        pass  # each rank streams from its own memory

    def sync_ranks(self) -> None:
        pass

    def close(self) -> None:
        if self.pinned is not None:
            self.pinned.release_host_buffers()
