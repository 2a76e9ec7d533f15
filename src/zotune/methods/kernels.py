"""Fused CPU kernels for the sweeps of Rademacher directions (format 2) and of LOZO's ±1 low-rank
directions, compiled with numba.

The eager path of a sweep computes the counter words, expands them to ±1 floats in a scratch
buffer (three integer passes) and adds them: six passes over memory per chunk, bounded by cache
bandwidth and op overhead. Here one parallel pass makes the words (1/32 of the tensor's bytes) and a
second updates each value once, on every core. The float32 operations are the eager path's, in
the same order (x + a·z, x·d, x + b·z with z = ±1, so a·z is exact), and the words are the same
integers: both paths give the same bits (tested). Without numba, or for other dtypes and devices,
callers take the eager path.

LOZO's direction for a matrix is Z = U·Vᵀ with ±1 factors of rank r in {1, 2, 4}: every entry is an
exact integer 0 or ±2^j, so scale·Z is exact and `low_rank_axpy` (Z summed per value, then the same
three float operations) gives the eager path's bits (a matrix product into a scratch chunk, then the
adds) in one pass instead of two, without the scratch.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext

import torch

_lock = threading.Lock()  # one kernel at a time: numba's default threading layers are not re-entrant
_kernels = None  # (words, apply, low_rank, serial words, serial apply) once compiled; False: no numba
SERIAL_BELOW = 1 << 15  # values: a smaller tensor takes the serial kernels (the same bits, no thread pool)


def _compile():
    import numba
    import numpy as np

    golden, mix1, mix2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    s30, s27, s31 = np.uint64(30), np.uint64(27), np.uint64(31)

    def words(out, key, first):  # out[j] = splitmix64 word first + j keyed by key (perturb.counter_words)
        for j in numba.prange(out.shape[0]):
            x = key + np.uint64(first + j + 1) * golden
            x = (x ^ (x >> s30)) * mix1
            x = (x ^ (x >> s27)) * mix2
            out[j] = x ^ (x >> s31)

    def apply(p, signs, scale, decay, then):  # p: rows of (up to) 32 values, row m's signs in int32 word m
        minus_scale, minus_then = -scale, -then  # ±a instead of a·z: the same float (z = ±1)
        for m in numba.prange(p.shape[0]):
            word = signs[m]
            for k in range(p.shape[1]):
                negative = (word >> (31 - k)) & 1  # value 32m + k: −1 if bit 31 − k is set
                x = p[m, k]
                if scale != 0:
                    x = x + (minus_scale if negative else scale)
                if decay != 1:
                    x = x * decay
                if then != 0:
                    x = x + (minus_then if negative else then)
                p[m, k] = x

    @numba.njit(inline="always")
    def step(x, z, scale, decay, then):  # perturb.step_ on one value
        if scale != 0:
            x = x + scale * z
        if decay != 1:
            x = x * decay
        if then != 0:
            x = x + then * z
        return x

    @numba.njit(parallel=True, cache=True, nogil=True)
    def low_rank(p, u, vt, scale, decay, then):  # p (m × n) ← (p + scale·Z)·decay + then·Z, Z = U·Vᵀ, vt = Vᵀ
        r = u.shape[1]  # 1, 2 or 4: one plain loop over a row each (they vectorise)
        for a in numba.prange(p.shape[0]):
            row = p[a]
            if r == 1:
                u0 = u[a, 0]
                for b in range(row.shape[0]):
                    row[b] = step(row[b], u0 * vt[0, b], scale, decay, then)
            elif r == 2:
                u0, u1 = u[a, 0], u[a, 1]
                for b in range(row.shape[0]):
                    row[b] = step(row[b], u0 * vt[0, b] + u1 * vt[1, b], scale, decay, then)
            else:
                u0, u1, u2, u3 = u[a, 0], u[a, 1], u[a, 2], u[a, 3]
                for b in range(row.shape[0]):
                    z = u0 * vt[0, b] + u1 * vt[1, b] + u2 * vt[2, b] + u3 * vt[3, b]
                    row[b] = step(row[b], z, scale, decay, then)

    # each twice: parallel for large tensors, serial for small ones (a final norm of 576 values would pay
    # the thread pool's start and join, tens of microseconds, for under a microsecond of work)
    parallel = [numba.njit(parallel=True, cache=True, nogil=True)(f) for f in (words, apply)]
    serial = [numba.njit(nogil=True)(f) for f in (words, apply)]  # (not cached: the cache keys by function)
    return (*parallel, low_rank, *serial)


def available() -> bool:
    """Whether the fused kernel can run here (numba importable); compiled on first use."""
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                try:
                    _kernels = _compile()
                except ImportError:
                    _kernels = False
    return bool(_kernels)


@contextmanager
def _on_torch_threads():
    """A parallel kernel on torch's number of threads (the user's `run.threads` or OMP_NUM_THREADS), and
    torch's number given back after it: numba's OpenMP layer sets the process's OpenMP count to its own
    (every core) when it starts, which would leave the forwards that follow on more threads than asked
    (a different matmul summation, so different bits, and oversubscribed ranks)."""
    import numba

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def signs_axpy(p: torch.Tensor, key: int, first_word: int, scale: float, decay: float = 1.0, then: float = 0.0) -> None:
    """p ← (p + scale·z)·decay + then·z in place, z the signs of counter words `first_word`, ... of `key`.

    `p`: a contiguous float32 CPU tensor. A term equal to 0 (or a decay of 1) is skipped, as in the
    eager path.
    """
    import numpy as np

    flat = p.detach().view(-1)
    signs = torch.empty((flat.numel() + 63) // 64, dtype=torch.int64)
    small = flat.numel() <= SERIAL_BELOW
    words, apply = _kernels[3:5] if small else _kernels[:2]
    with _lock, _on_torch_threads() if not small else nullcontext():
        words(signs.numpy().view(np.uint64), np.uint64(key), first_word)
        values, bits = flat.numpy(), signs.view(torch.int32).numpy()
        terms = np.float32(scale), np.float32(decay), np.float32(then)
        rows = values.shape[0] // 32  # 2-D rows of 32 vectorise; a flat index does not
        apply(values[: rows * 32].reshape(rows, 32), bits, *terms)
        if values.shape[0] > rows * 32:
            apply(values[rows * 32:].reshape(1, -1), bits[rows:], *terms)


def low_rank_axpy(p: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float, decay: float = 1.0,
                  then: float = 0.0) -> None:
    """p ← (p + scale·Z)·decay + then·Z in place, Z = U·Vᵀ, for `p` a contiguous float32 CPU m × n matrix
    and U (m × r), V (n × r) holding ±1 with r in {1, 2, 4} (so that scale·Z is exact: the caller checks)."""
    import numpy as np

    low_rank = _kernels[2]
    terms = np.float32(scale), np.float32(decay), np.float32(then)
    with _lock, _on_torch_threads():
        low_rank(p.detach().numpy(), u.contiguous().numpy(), v.T.contiguous().numpy(), *terms)
