"""Sparse MeZO (Liu et al., 2024): perturb and update only the small-magnitude weights of each tensor.

Tensor i's threshold τ_i is the (1 − sparsity) quantile of |θ_i| at the first step (one float per
tensor, kept in its state: it travels with a streamed block; a resumed resident run replays from
the base weights to find it again; above 4M values, the quantile of every m-th value, so that memory
stays at one chunk's scale). At every step the mask
m_i = |θ_i| ≤ τ_i is taken from the weights at rest, at the step's first move, and every move and
the update use z ⊙ m, chunk by chunk (one chunk of scratch, as ZO-SGD). The mask is held as bits
(1/32 of the tensor's bytes) until the update and then dropped: it cannot be recomputed on the perturbed weights,
because a value within ε of τ_i
changes sides between the moves (about 1-2% of values at ε = 1e-3), and the moves would then not
undo each other. That is the one departure from "recomputed on the fly": a transient bit per value,
never a persistent mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zotune.config import ConfigError
from zotune.methods.perturb import step_
from zotune.methods.registry import MethodConfig, register_method
from zotune.methods.zosgd import ZOSGD, StepRecord

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_SAMPLE = 1 << 22  # values a threshold is taken from, at most about twice this (every m-th value)


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = (1 << torch.arange(8, dtype=torch.uint8)).to(device)
    return _BIT_WEIGHTS[device]


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, 8 to a byte (padded with zeros)."""
    flat = mask.reshape(-1)
    padded = torch.zeros((flat.numel() + 7) // 8 * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)


def unpack(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool tensor shaped like `like` that `pack` made `bits` from."""
    flat = torch.bitwise_and(bits.unsqueeze(1), _bit_weights(bits.device)).ne(0).view(-1)
    return flat[: like.numel()].view(like.shape)


@dataclass
class SparseConfig(MethodConfig):
    sparsity: float = 0.75  # the fraction of each tensor's values left out: the largest in magnitude

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise ConfigError(f"method.sparsity={self.sparsity} must be in [0, 1): the fraction of each tensor's "
                              f"values left out (the largest in magnitude), e.g. 0.75")


class SparseMeZO(ZOSGD):
    replays_from_base = True  # the thresholds come from the step-0 weights, which snapshots do not hold

    def __init__(self, params, sparsity: float = 0.75, **options):
        super().__init__(params, sparsity=sparsity, **options)
        self.sparsity = float(self.cfg.sparsity)
        # state_of(i): "threshold" (τ_i), and a step's mask: "mask" (packed bits) for the step of "mask_seed"

    def _bits(self, i: int, p: torch.Tensor, seed: int) -> tuple[torch.Tensor, bool]:
        """The packed mask of tensor i for the step with `seed`, and whether it is still to be filled
        (then the first sweep fills it, chunk by chunk, from the weights at rest)."""
        state = self.state_of(i)
        if state.get("mask_seed") == seed:
            return state["mask"], False
        if not p.is_contiguous():
            raise ConfigError("sparse-mezo needs contiguous parameters; call .contiguous() on them before training")
        if "threshold" not in state:  # at the first step; a large tensor's quantile from an even sample
            values = p.detach().reshape(-1)[:: max(1, p.numel() // _SAMPLE)].abs()  # at most 2·_SAMPLE values
            k = max(1, round((1 - self.sparsity) * values.numel()))  # how many values take part
            state["threshold"] = float(values.kthvalue(k).values)
        bits = torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8, device=p.device)
        state.update(mask_seed=seed, mask=bits)
        return bits, True

    def _sweep(self, i: int, p: torch.Tensor, seed: int, k: int, scale: float, decay: float = 1.0,
               then: float = 0.0) -> None:
        """p ← (p + scale·z⊙m)·decay + then·z⊙m chunk by chunk (CHUNK is a multiple of 8: a chunk's mask
        is whole bytes), as `Directions.add` does for ZO-SGD; the first sweep of a step takes m."""
        bits, fill = self._bits(i, p, seed)
        threshold = self.state_of(i)["threshold"]

        def fn(piece: torch.Tensor, z: torch.Tensor, start: int) -> None:
            if fill:
                mask = piece.abs() <= threshold
                bits[start // 8: start // 8 + (piece.numel() + 7) // 8] = pack(mask)
            else:
                mask = unpack(bits[start // 8: start // 8 + (piece.numel() + 7) // 8], piece)
            step_(piece, z.mul_(mask), scale, decay, then)

        self._directions.apply(p.view(-1), seed, k, i, fn, offsets=True)

    def move(self, indexed, key, k: int, scale: float) -> None:
        for i, p in indexed:
            self._sweep(i, p, key.seed, k, scale)

    def undo(self, indexed, key, offset: dict[int, float]) -> None:
        super().undo(indexed, key, offset)
        for i, _ in indexed:
            self._drop_mask(i)

    def update_tensor(self, i: int, p: torch.Tensor, record: StepRecord, lr: float, wd: float, restore: float) -> None:
        n, seed = self.n_directions, record.seed
        decay = 1 - lr * wd if wd else 1.0
        for k in range(n):  # as ZO-SGD: with one direction the restore is fused; decay once, at the first
            self._sweep(i, p, seed, k, restore, decay if k == 0 else 1.0, -lr * record.grads[k] / n)
        self._drop_mask(i)  # the step is done: its mask goes

    def _drop_mask(self, i: int) -> None:
        state = self.state_of(i)
        state.pop("mask", None)
        state.pop("mask_seed", None)

    def load_state_dict(self, state_dict):
        thresholds = state_dict.get("zo", {}).get("thresholds")  # where state dicts before 2026-12 kept them
        super().load_state_dict(state_dict)
        for i, t in (thresholds or {}).items():
            self.state_of(int(i)).setdefault("threshold", float(t))


register_method("sparse-mezo", SparseConfig, SparseMeZO)
