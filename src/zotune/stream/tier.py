"""What the streaming engine asks of a tier: where blocks live between visits (`RamTier`, `DiskTier`).

A tier stores, for each transformer block, its parameters by name, and a small state per block (how
many updates it has had, and whether it holds the perturbation of an unfinished step) so that the
engine can bring any block up to date lazily, and a durable tier's run can resume after a kill.
Trainable tensors are kept as float32 "masters" whatever the storage dtype: MeZO-sized updates
(about 1e-7 relative) are below a 16-bit format's resolution and would round away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class BlockState:
    """How far a stored block is: `version` updates applied, plus maybe the moves of step `perturbed`."""

    version: int = 0
    perturbed: int = -1  # the step whose probe moves the stored values carry, or -1
    seed: int = 0  # that step's seed (to take the moves back if the step never finished)


class Tier(Protocol):
    """The engine's view of a tier. `durable`: the tier outlives the process (it is the checkpoint of the
    blocks, keeps the block before its last write-back, and stores the optimizer state of each block)."""

    durable: bool

    def __len__(self) -> int: ...

    def read(self, j: int, pool=None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """(block j's tensors, trained ones as float32 masters; the `pool` buffers they use)."""

    def values(self, j: int, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors of block j, holding no buffer of the whole block (snapshots, digests)."""

    def host_storage(self, j: int) -> dict[str, torch.Tensor]:
        """Host tensors a write-back of block j may copy into directly (none: the tier copies itself)."""

    def write(self, j: int, tensors: dict[str, torch.Tensor], state: BlockState,
              opt_state: dict[str, dict] | None = None) -> None:
        """Block j's trained tensors (and, on a durable tier, their optimizer state), now at `state`."""

    def read_opt_state(self, j: int) -> dict[str, dict]:
        """The optimizer state a durable tier holds for block j, by tensor name."""

    def get_state(self, j: int) -> BlockState: ...

    def previous(self, j: int) -> BlockState | None:
        """Block j as it was before its last write-back (None: the tier keeps no such copy)."""

    def go_back(self, j: int) -> None:
        """Make block j what it was before its last write-back (only where `previous` is not None)."""

    def add_masters(self, j: int, names: list[str]) -> None:
        """Keep the named tensors of block j as float32 masters from now on."""

    def set_master(self, j: int, name: str, value: torch.Tensor) -> None: ...

    def join(self, group) -> None:
        """Serve the ranks of `group` (a `zotune.parallel.Group` of several processes): collective."""

    def sync_ranks(self) -> None:
        """After `add_masters` on every rank: every rank sees what the tier's one writer created."""

    def close(self) -> None: ...
