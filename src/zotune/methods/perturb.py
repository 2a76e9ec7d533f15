"""Seeded directions and in-place sweeps over parameters: the hot loop of every ZO method.

Direction k of a step with seed s, for trainable tensor i, is regenerated from (s, k, i) with
explicit `torch.Generator`s on the tensor's device whenever it is needed; it is never stored and the
global RNG is never touched, so no other random draw (dropout, sampling) can change it.

A tensor's direction is drawn in fixed chunks of CHUNK values, chunk c from its own seed
(s, k, i, c). The values therefore do not depend on how many threads draw them, and on CPU the
chunks of a large tensor are drawn on every core (one `normal_` runs on one thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

_MASK64 = (1 << 64) - 1
CHUNK = 1 << 20
DISTRIBUTIONS = ("gaussian", "rademacher")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def direction_seed(step_seed: int, direction: int, tensor_index: int, chunk: int = 0) -> int:
    """A well-mixed 63-bit generator seed for (step seed, direction k, tensor i, chunk c)."""
    h = _splitmix64(step_seed & _MASK64)
    h = _splitmix64(h ^ direction)
    h = _splitmix64(h ^ tensor_index)
    if chunk:
        h = _splitmix64(h ^ chunk)
    return h >> 1  # manual_seed wants a value that fits in int64 on every backend


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def draw(out: torch.Tensor, gen: torch.Generator, distribution: str) -> None:
    """Fill a 1-D `out` with N(0, 1) values, or with ±1 (Rademacher: a valid SPSA direction, cheaper)."""
    if distribution == "gaussian":
        out.normal_(generator=gen)
        return
    # Rademacher from random bytes: 8 signs per byte, about 3x cheaper than normal_ on CPU.
    shifts = _SHIFTS.get(out.device)
    if shifts is None:
        shifts = _SHIFTS[out.device] = torch.arange(8, dtype=torch.uint8, device=out.device)
    n = out.numel()
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=out.device).random_(0, 256, generator=gen)
    bits = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(1), shifts), 1).view(-1)[:n]
    out.copy_(bits).mul_(2).sub_(1)


def _scratch(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # A normal tensor even when first needed under inference mode (an evaluation that settles a
    # streamed block): an inference tensor could not be written to in a later step.
    with torch.inference_mode(False):
        return torch.empty(CHUNK, device=device, dtype=dtype)


class Directions:
    """Regenerates z for (step seed, direction, tensor index), chunk by chunk.

    Sweeps draw each chunk into a per-thread scratch buffer of CHUNK values and apply it while it
    is in cache: memory is one chunk per thread, whatever the model size.
    """

    def __init__(self, distribution: str = "gaussian", threads: int | None = None) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={distribution!r}; use one of {DISTRIBUTIONS}")
        self.distribution = distribution
        self.threads = threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._local = threading.local()  # a Generator is not thread-safe: one per thread and device

    def _per_thread(self, name: str, key, make):
        store = getattr(self._local, name, None)
        if store is None:
            store = {}
            setattr(self._local, name, store)
        if key not in store:
            store[key] = make()
        return store[key]

    def _each_chunk(self, n: int, device: torch.device, step_seed: int, direction: int, tensor_index: int,
                    body: Callable[[int, torch.Generator], None]) -> None:
        """body(start, generator seeded for that chunk) for every chunk, on every core on CPU."""

        @torch.no_grad()  # grad mode is per thread: the pool's threads do not inherit the caller's
        def one(start: int) -> None:
            gen = self._per_thread("gens", device, lambda: torch.Generator(device=device))
            gen.manual_seed(direction_seed(step_seed, direction, tensor_index, start // CHUNK))
            body(start, gen)

        starts = range(0, n, CHUNK)
        if self._pool is not None and device.type == "cpu" and len(starts) > 1:
            list(self._pool.map(one, starts))
        else:
            for start in starts:
                one(start)

    def z(self, like: torch.Tensor, step_seed: int, direction: int, tensor_index: int) -> torch.Tensor:
        """z shaped like `like`, as a new tensor (for tensors that are not contiguous, and for tests)."""
        flat = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
        self._each_chunk(flat.numel(), like.device, step_seed, direction, tensor_index,
                         lambda start, gen: draw(flat[start: start + CHUNK], gen, self.distribution))
        return flat.view(like.shape)

    def apply(self, p: torch.Tensor, step_seed: int, direction: int, tensor_index: int,
              fn: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Call fn(piece of p, the same piece of z) chunk by chunk, in place, on every core.

        Each chunk of z is drawn into a per-thread scratch buffer and used while it is in cache,
        so z is never materialised for the whole tensor.
        """
        if not p.is_contiguous():
            fn(p, self.z(p, step_seed, direction, tensor_index))
            return
        flat = p.view(-1)
        device, dtype = p.device, p.dtype

        def body(start: int, gen: torch.Generator) -> None:
            piece = flat[start: start + CHUNK]
            buf = self._per_thread("scratch", (device, dtype), lambda: _scratch(device, dtype))
            z = buf[: piece.numel()]
            draw(z, gen, self.distribution)
            fn(piece, z)

        self._each_chunk(flat.numel(), device, step_seed, direction, tensor_index, body)

    def sweep(self, params: Sequence[torch.Tensor], step_seed: int, direction: int, scale: float) -> None:
        """θ_i += scale · z_i for every tensor, in place."""
        with torch.no_grad():
            for i, p in enumerate(params):
                self.apply(p, step_seed, direction, i, lambda piece, z: piece.add_(z, alpha=scale))
