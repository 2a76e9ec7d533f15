"""Seeded directions and in-place sweeps over parameters: the hot loop of every ZO method.

Direction k of a step with seed s, for trainable tensor i, is regenerated from (s, k, i) with
explicit `torch.Generator`s on the tensor's device whenever it is needed; it is never stored and the
global RNG is never touched, so no other random draw (dropout, sampling) can change it.

Gaussian directions are drawn in fixed chunks of CHUNK values, chunk c by a generator seeded from
(s, k, i, c): the values do not depend on how many threads draw them, and on CPU the chunks of a
large tensor are drawn on every core (one `normal_` runs on one thread).

Rademacher directions are counter-based (format 2): the signs of values 64j .. 64j + 63 are the
bits of word j of the splitmix64 sequence keyed by (s, k, i), so any piece of z is computed where
it is needed, in any order, on any device, with integer operations only (the same bits everywhere).
On a float32 CPU tensor, a fused kernel (`kernels`) makes the words and applies them in two passes;
on a float32 CUDA tensor, a Triton kernel (`triton_sweep`) does both in one launch.

The draw is versioned (`FORMAT`) because a run's step log is only meaningful with the directions it
was trained with: format 1 drew Rademacher signs from one `torch.Generator` byte per 8 values, chunk
by chunk. Gaussian directions are the same in both. A run folder records its format and replays with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from zotune.methods import kernels, triton_sweep

_MASK64 = (1 << 64) - 1
CHUNK = 1 << 20
# Rademacher directions of format 2 are the same bits whatever the chunk: on an accelerator a sweep
# takes 16x larger chunks, so a 7B model's step launches about 16x fewer kernels (64 MB of scratch).
ACCELERATOR_CHUNK = 1 << 24
SLAB = 1 << 26  # values a fused kernel call covers (its words take 8 MB)
DISTRIBUTIONS = ("gaussian", "rademacher")
FORMAT = 2  # the direction format new runs use; see the module docstring
FORMATS = (1, 2)


def drawn_on(device: torch.device) -> str:
    """What directions that depend on the device were drawn by: the device kind, and the GPU model
    (CUDA's `normal_` sizes its launch, hence which random numbers land where, by the GPU's cores)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def device_dependent(distribution: str, version: int) -> bool:
    """Whether directions of this kind differ between devices. Rademacher format 2 is integer
    arithmetic on counters (the same bits everywhere, and z = ±1 makes a·z exact, so the updates
    match too); Gaussian values and format 1's bytes come from each device's own generator."""
    return distribution == "gaussian" or version == 1


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


_BYTE_SHIFTS: dict[torch.device, torch.Tensor] = {}
_WORD_SHIFTS: dict[torch.device, torch.Tensor] = {}
_SIGN, _ONE = -(1 << 31), 0x3F800000  # the sign bit and the bits of 1.0 in a float32


def _cached(store: dict, device: torch.device, make) -> torch.Tensor:
    if device not in store:
        store[device] = make().to(device)
    return store[device]


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _as_int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic: it copies the sign bit)."""
    return torch.bitwise_and(torch.bitwise_right_shift(x, bits), (1 << (64 - bits)) - 1)


def counter_words(key: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Words first .. first + count − 1 of the splitmix64 sequence keyed by `key`, as int64 bits:
    word j = mix(key + (j + 1)·γ) mod 2^64 (`_splitmix64(key + j·γ)`), a counter-based generator."""
    x = torch.arange(first + 1, first + count + 1, dtype=torch.int64, device=device)
    x.mul_(_as_int64(_GOLDEN)).add_(_as_int64(key & _MASK64))  # int64 arithmetic wraps mod 2^64
    x.bitwise_xor_(_shift_right(x, 30)).mul_(_as_int64(_MIX1))
    x.bitwise_xor_(_shift_right(x, 27)).mul_(_as_int64(_MIX2))
    return x.bitwise_xor_(_shift_right(x, 31))


def signs_from_words(out: torch.Tensor, words: torch.Tensor) -> None:
    """out[32m + k] = −1 if bit 31 − k of int32 word m is set, else +1 (`words`: int64, viewed as
    int32 little-endian): three integer passes write the float32 bits of ±1."""
    n = out.numel()
    signs = words.view(torch.int32)[: (n + 31) // 32].unsqueeze(1)
    shifts = _cached(_WORD_SHIFTS, out.device, lambda: torch.arange(32, dtype=torch.int32))
    in_place = out.dtype == torch.float32 and n % 32 == 0 and out.is_contiguous()
    bits = out.view(torch.int32).view(-1, 32) if in_place else torch.empty(
        signs.shape[0], 32, dtype=torch.int32, device=out.device)
    torch.bitwise_left_shift(signs, shifts, out=bits)
    bits.bitwise_and_(_SIGN).bitwise_or_(_ONE)
    if not in_place:
        out.copy_(bits.view(torch.float32).view(-1)[:n])


def draw(out: torch.Tensor, gen: torch.Generator, distribution: str, version: int = FORMAT,
         key: int = 0, start: int = 0) -> None:
    """Fill a 1-D `out` with z for values start .. start + len − 1 of a tensor: N(0, 1) from `gen`, or
    ±1 (Rademacher: a valid SPSA direction, much cheaper) from the counter words of `key`."""
    if distribution == "gaussian":
        out.normal_(generator=gen)
    elif version == 1:
        _rademacher_bytes(out, gen)
    else:
        signs_from_words(out, counter_words(key, start // 64, (out.numel() + 63) // 64, out.device))


def _rademacher_bytes(out: torch.Tensor, gen: torch.Generator) -> None:
    """Format 1: value 8j + k takes its sign from bit k of random byte j (kept to replay older runs)."""
    shifts = _cached(_BYTE_SHIFTS, out.device, lambda: torch.arange(8, dtype=torch.uint8))
    n = out.numel()
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=out.device).random_(0, 256, generator=gen)
    bits = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(1), shifts), 1).view(-1)[:n]
    out.copy_(bits).mul_(2).sub_(1)


def step_(piece: torch.Tensor, z: torch.Tensor, scale: float, decay: float = 1.0, then: float = 0.0) -> None:
    """piece ← (piece + scale·z)·decay + then·z in place; a term equal to 0 (or a decay of 1) is skipped.
    The one sequence of float operations every sweep uses (the fused kernel repeats it exactly)."""
    if scale:
        piece.add_(z, alpha=scale)
    if decay != 1:
        piece.mul_(decay)
    if then:
        piece.add_(z, alpha=then)


def _scratch(device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
    # A normal tensor even when first needed under inference mode (an evaluation that settles a
    # streamed block): an inference tensor could not be written to in a later step.
    with torch.inference_mode(False):
        return torch.empty(n, device=device, dtype=dtype)


class Directions:
    """Regenerates z for (step seed, direction, tensor index), chunk by chunk.

    Sweeps draw each chunk into a per-thread scratch buffer of CHUNK values and apply it while it
    is in cache: memory is one chunk per thread, whatever the model size.
    """

    def __init__(self, distribution: str = "rademacher", threads: int | None = None, version: int = FORMAT) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={distribution!r}; use one of {DISTRIBUTIONS}")
        if version not in FORMATS:
            raise ValueError(f"direction format {version} is not known to this zotune (it knows "
                             f"{FORMATS}); upgrade zotune")
        self.distribution = distribution
        self.version = version
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

    def chunk(self, device: torch.device) -> int:
        """Values drawn at a time on `device`: CHUNK, which seeds Gaussian chunks (fixed), or larger
        for counter-based directions on an accelerator (the same bits, fewer kernel launches)."""
        counter_based = self.distribution == "rademacher" and self.version == 2
        return ACCELERATOR_CHUNK if counter_based and device.type != "cpu" else CHUNK

    def _each_chunk(self, n: int, device: torch.device, step_seed: int, direction: int, tensor_index: int,
                    body: Callable[[int, torch.Generator], None]) -> None:
        """body(start, generator seeded for that chunk, or None for counter-based directions) for every
        chunk, on every core on CPU."""

        counter_based = self.distribution == "rademacher" and self.version == 2

        @torch.no_grad()  # grad mode is per thread: the pool's threads do not inherit the caller's
        def one(start: int) -> None:
            gen = None  # counter-based directions draw from their key, not a generator
            if not counter_based:
                gen = self._per_thread("gens", device, lambda: torch.Generator(device=device))
                gen.manual_seed(direction_seed(step_seed, direction, tensor_index, start // CHUNK))
            body(start, gen)

        starts = range(0, n, self.chunk(device))
        # Rademacher drawing is not bound to one thread: each op runs on every core by itself.
        if self._pool is not None and device.type == "cpu" and len(starts) > 1 and self.distribution == "gaussian":
            list(self._pool.map(one, starts))
        else:
            for start in starts:
                one(start)

    def z(self, like: torch.Tensor, step_seed: int, direction: int, tensor_index: int) -> torch.Tensor:
        """z shaped like `like`, as a new tensor (for tensors that are not contiguous, and for tests)."""
        flat = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
        key, chunk = direction_seed(step_seed, direction, tensor_index), self.chunk(like.device)
        self._each_chunk(flat.numel(), like.device, step_seed, direction, tensor_index,
                         lambda start, gen: draw(flat[start: start + chunk], gen, self.distribution, self.version,
                                                 key, start))
        return flat.view(like.shape)

    def apply(self, p: torch.Tensor, step_seed: int, direction: int, tensor_index: int,
              fn: Callable[..., None], offsets: bool = False) -> None:
        """Call fn(piece of p, the same piece of z) chunk by chunk, in place, on every core; with
        `offsets`, fn(piece, z, start) where start is the piece's first flat index in p.

        Each chunk of z is drawn into a per-thread scratch buffer and used while it is in cache,
        so z is never materialised for the whole tensor.
        """
        if not p.is_contiguous():
            if offsets:
                raise ValueError("offsets need a contiguous tensor")
            fn(p, self.z(p, step_seed, direction, tensor_index))
            return
        flat = p.view(-1)
        device, dtype = p.device, p.dtype
        key, chunk = direction_seed(step_seed, direction, tensor_index), self.chunk(device)

        def body(start: int, gen: torch.Generator) -> None:
            piece = flat[start: start + chunk]
            buf = self._per_thread("scratch", (device, dtype), lambda: _scratch(device, dtype, chunk))
            z = buf[: piece.numel()]
            draw(z, gen, self.distribution, self.version, key, start)
            if offsets:
                fn(piece, z, start)
            else:
                fn(piece, z)

        self._each_chunk(flat.numel(), device, step_seed, direction, tensor_index, body)

    def add(self, p: torch.Tensor, step_seed: int, direction: int, tensor_index: int, scale: float,
            decay: float = 1.0, then: float = 0.0) -> None:
        """p ← (p + scale·z)·decay + then·z in place: a move (scale alone) or a fused restore + update.

        A term equal to 0 (or a decay of 1) is skipped. Rademacher directions of format 2 on a float32
        CPU tensor take the fused kernel when numba is installed (`kernels`): the same bits in one
        pass; everything else is drawn and applied chunk by chunk.
        """
        if self._fused(p):
            flat, key = p.view(-1), direction_seed(step_seed, direction, tensor_index)
            for start in range(0, flat.numel(), SLAB):  # the words of a slab: 1/32 of its bytes
                kernels.signs_axpy(flat[start: start + SLAB], key, start // 64, scale, decay, then)
            return
        if self._fused_on_device(p):
            if triton_sweep.signs_axpy(p, direction_seed(step_seed, direction, tensor_index), 0, scale, decay, then):
                return

        self.apply(p, step_seed, direction, tensor_index, lambda piece, z: step_(piece, z, scale, decay, then))

    fused = True  # False: always the eager path (the reference the kernel is tested against)

    def _fused(self, p: torch.Tensor) -> bool:
        if not (self.fused and self.distribution == "rademacher" and self.version == 2 and p.device.type == "cpu"
                and p.dtype == torch.float32 and p.is_contiguous()):
            return False
        return kernels.available()

    def _fused_on_device(self, p: torch.Tensor) -> bool:
        """The Triton kernel of `triton_sweep` (one launch a tensor, the same bits) on a float32 CUDA tensor."""
        if not (self.fused and self.distribution == "rademacher" and self.version == 2):
            return False
        return triton_sweep.available(p)

    def sweep(self, params: Sequence[torch.Tensor], step_seed: int, direction: int, scale: float) -> None:
        """θ_i += scale · z_i for every tensor, in place."""
        with torch.no_grad():
            for i, p in enumerate(params):
                self.add(p, step_seed, direction, i, scale)
