"""Seeded directions and in-place sweeps over parameters: the hot loop of every ZO method.

Direction k of a step with seed s, for trainable tensor i, is regenerated from (s, k, i) with an
explicit `torch.Generator` on the tensor's device whenever it is needed; it is never stored and the
global RNG is never touched, so no other random draw (dropout, sampling) can change it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def direction_seed(step_seed: int, direction: int, tensor_index: int) -> int:
    """A well-mixed 63-bit generator seed for (step seed, direction k, tensor i)."""
    h = _splitmix64(step_seed & _MASK64)
    h = _splitmix64(h ^ direction)
    h = _splitmix64(h ^ tensor_index)
    return h >> 1  # manual_seed wants a value that fits in int64 on every backend


class Directions:
    """Regenerates z for (step seed, direction, tensor index) into a reused scratch buffer.

    One generator and one scratch buffer per (device, dtype): memory is one tensor's worth of z,
    whatever the model size.
    """

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def z(self, like: torch.Tensor, step_seed: int, direction: int, tensor_index: int) -> torch.Tensor:
        """z ~ N(0, I) shaped like `like`. Valid until the next call on the same device and dtype."""
        device, dtype = like.device, like.dtype
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(direction_seed(step_seed, direction, tensor_index))
        key = (device, dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._scratch[key] = torch.empty(like.numel(), device=device, dtype=dtype)
        out = buf[: like.numel()].view(like.shape)
        return out.normal_(generator=gen)

    def sweep(self, params: Sequence[torch.Tensor], step_seed: int, direction: int, scale: float) -> None:
        """θ_i += scale · z_i for every tensor, in place."""
        with torch.no_grad():
            for i, p in enumerate(params):
                p.add_(self.z(p, step_seed, direction, i), alpha=scale)
