"""Sparse MeZO (Liu et al., 2024): perturb and update only the small-magnitude weights of each tensor.

Tensor i's threshold τ_i is the (1 − sparsity) quantile of |θ_i| at the first step (one float per
tensor, from the base weights: a resumed run replays from them). At every step the mask
m_i = |θ_i| ≤ τ_i is taken from the weights at rest, at the step's first move, and every move and
the update use z ⊙ m. The mask is held as bits (1/32 of the tensor's bytes) until the update and
then dropped: it cannot be recomputed on the perturbed weights, because a value within ε of τ_i
changes sides between the moves (about 1-2% of values at ε = 1e-3), and the moves would then not
undo each other. That is the one departure from "recomputed on the fly": a transient bit per value,
never a persistent mask.
"""

from __future__ import annotations


import torch

from zotune.config import ConfigError
from zotune.methods.zosgd import ZOSGD, StepRecord

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


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


class SparseMeZO(ZOSGD):
    streamable = False
    why_not_streamable = "its per-step masks are not kept with streamed blocks yet"
    replays_from_base = True  # the thresholds come from the step-0 weights, which snapshots do not hold

    def __init__(self, params, sparsity: float = 0.75, **options):
        super().__init__(params, **options)
        if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
            raise ConfigError(f"sparsity={sparsity} must be in [0, 1): the fraction of each tensor's values left "
                              f"out (the largest in magnitude), e.g. 0.75")
        self.sparsity = float(sparsity)
        self.thresholds: dict[int, float] = {}  # tensor index -> τ_i
        self._masks: dict[int, tuple[int, torch.Tensor]] = {}  # tensor index -> (step seed, packed mask)

    def _mask(self, i: int, p: torch.Tensor, seed: int) -> torch.Tensor:
        """m_i of the step with `seed`: from the weights now (at rest) the first time it is asked for."""
        held = self._masks.get(i)
        if held is not None and held[0] == seed:
            return unpack(held[1], p)
        if i not in self.thresholds:
            k = max(1, round((1 - self.sparsity) * p.numel()))  # how many values take part
            self.thresholds[i] = float(p.detach().abs().reshape(-1).kthvalue(k).values)
        mask = p.detach().abs() <= self.thresholds[i]
        self._masks[i] = (seed, pack(mask))
        return mask

    def _masked_z(self, i: int, p: torch.Tensor, seed: int, k: int) -> torch.Tensor:
        return self._directions.z(p, seed, k, i).mul_(self._mask(i, p, seed))  # one tensor of scratch

    def move(self, indexed, seed: int, k: int, scale: float) -> None:
        for i, p in indexed:
            p.add_(self._masked_z(i, p, seed, k), alpha=scale)

    def undo(self, indexed, seed: int, offset: dict[int, float]) -> None:
        super().undo(indexed, seed, offset)
        for i, _ in indexed:
            self._masks.pop(i, None)

    def _update_tensor(self, i: int, p: torch.Tensor, record: StepRecord, lr: float, wd: float, restore: float) -> None:
        n, seed = self.n_directions, record.seed
        for k in range(n):
            zm = self._masked_z(i, p, seed, k)
            if restore:
                p.add_(zm, alpha=restore)
            if wd and k == 0:
                p.mul_(1 - lr * wd)
            p.add_(zm, alpha=-lr * record.grads[k] / n)
        self._masks.pop(i, None)  # the step is done: its mask goes

    def state_dict(self):
        state = super().state_dict()
        state["zo"]["thresholds"] = dict(self.thresholds)
        return state

    def load_state_dict(self, state_dict):
        thresholds = state_dict.get("zo", {}).get("thresholds")
        super().load_state_dict(state_dict)
        if thresholds is not None:
            self.thresholds = {int(i): float(t) for i, t in thresholds.items()}
