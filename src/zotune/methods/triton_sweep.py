"""The fused sweeps of Rademacher directions (format 2) on CUDA, as Triton kernels: ZO-SGD's z, and
LOZO's ±1 low-rank Z = U·Vᵀ.

The eager path of a sweep launches about 20 kernels per chunk (the counter words, their expansion to
±1 floats, the adds); here one launch per tensor computes, for each value v, its word
(splitmix64 of word v // 64, the integer arithmetic of `perturb.counter_words`), its sign (bit
31 − (v mod 32) of the word's low or high half, as `perturb.signs_from_words`) and the move, reading
and writing the tensor once. The float operations are the eager path's, in the same order:
x + (±a), x·d, x + (±b) (z = ±1, so a·z is exact and is a sign flip here), each rounded on its
own: the kernel is compiled with `enable_fp_fusion=False`, since x·d + b fused into one multiply-add
would round once where the CPU rounds twice. So the bits are the CPU's (tested on the CPU through
Triton's interpreter, `TRITON_INTERPRET=1`; on a GPU by `zotune bench gpu`).

LOZO's kernel does the same for a matrix: program (a, c) takes row a and a block of columns, makes
the r signs of U's row a and of V's columns from their own counter words (the values `Directions.z`
gives the factors, U's row a being values a·r .. a·r + r − 1 of its draw), sums z = Σ u_j·v_j (exact
small integers) and applies the same three float operations: one launch a matrix instead of drawing
U and V (about 30 launches) and a matrix product and three adds per row chunk.

Used for float32 CUDA tensors when Triton is importable (it comes with CUDA builds of torch);
everything else takes the eager path.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

BLOCK = 1024  # values per program
MAX_COLUMNS = 65_535 * BLOCK  # a matrix's columns the low-rank kernel takes (CUDA's grid: 65,535 in y)


@functools.cache
def _kernels():
    """(the sweep, the low-rank sweep, HiZOO's sweep), imported on first use (`triton_kernels` imports Triton)."""
    from zotune.methods import triton_kernels

    return triton_kernels.sweep, triton_kernels.low_rank, triton_kernels.hizoo


_failed: str | None = None  # why the kernel could not be built here (then every sweep is eager)


def available(p: torch.Tensor) -> bool:
    """Whether the kernel takes `p`: a contiguous float32 CUDA tensor, with Triton importable and able to
    build the kernel."""
    if _failed is not None or not (p.device.type == "cuda" and p.dtype == torch.float32 and p.is_contiguous()):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _launch(which: int, p: torch.Tensor, grid: tuple, args: tuple, **constexprs) -> bool:
    """Launch kernel `which` of `_kernels` on p's device; False (nothing written, a warning once) when
    this Triton cannot build it, and every later call then takes the eager path."""
    try:
        # Triton launches on the current device, not the tensor's: a tensor on cuda:1 enters cuda:1
        with torch.cuda.device(p.device) if p.device.type == "cuda" else contextlib.nullcontext():
            _kernels()[which][grid](*args, **constexprs, BLOCK=BLOCK, enable_fp_fusion=False)
    except Exception as e:  # noqa: BLE001 -- a Triton that cannot build it (before any value is written)
        global _failed
        if _failed is not None:
            raise
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        warnings.warn(f"zotune: the Triton sweep kernel could not be built ({_failed}); sweeps take the eager "
                      f"path (the same bits, more kernel launches)", stacklevel=3)
        return False
    return True


def _terms(scale: float, decay: float, then: float) -> dict:
    return dict(SCALE=scale != 0, DECAY=decay != 1, THEN=then != 0)


def signs_axpy(p: torch.Tensor, key: int, first_word: int, scale: float, decay: float = 1.0,
               then: float = 0.0) -> bool:
    """p ← (p + scale·z)·decay + then·z in place, z the signs of counter words `first_word`, ... of
    `key` (as `kernels.signs_axpy` on the CPU). `p`: contiguous float32; a zero term (or decay 1) is
    skipped. False (p untouched, a warning once) when this Triton cannot build the kernel."""
    import triton

    flat = p.detach().view(-1)
    n = flat.numel()
    if n == 0:
        return True
    return _launch(0, p, (triton.cdiv(n, BLOCK),), (flat, n, key, first_word, float(scale), float(decay),
                                                    float(then)), **_terms(scale, decay, then))


def low_rank_axpy(p: torch.Tensor, rank: int, key_u: int, key_v: int, scale: float, decay: float = 1.0,
                  then: float = 0.0) -> bool:
    """p (m × n, contiguous float32) ← (p + scale·Z)·decay + then·Z in place, Z = U·Vᵀ with U (m × r) and
    V (n × r) the ±1 draws keyed by `key_u` and `key_v` (LOZO's factors; r in {1, 2, 4}, so scale·Z is
    exact). False (p untouched, a warning once) when this Triton cannot build the kernel."""
    import triton

    m = p.shape[0]
    n = p.numel() // max(1, m)
    if p.numel() == 0:
        return True
    return _launch(1, p, (m, triton.cdiv(n, BLOCK)), (p.detach(), m, n, key_u, key_v, float(scale), float(decay),
                                                      float(then)), R=rank, **_terms(scale, decay, then))


def hessian_axpy(p: torch.Tensor, h: torch.Tensor, key: int, scale: float, decay: float = 1.0, then: float = 0.0,
                 smoothing: float | None = None, curvature: float = 0.0, floor: float = 0.0) -> bool:
    """HiZOO on a float32 CUDA tensor, one launch: p ← (p + scale·s)·decay + then·s, s = z/√H with z the
    signs of counter words of `key`; with `smoothing` α, then H ← max(H·(1 − α) + α·curvature, floor).
    False (nothing written, a warning once) when this Triton cannot build the kernel."""
    import triton

    flat, n = p.detach().view(-1), p.numel()
    if n == 0:
        return True
    hessian = smoothing is not None
    args = (flat, h.view(-1), n, key, float(scale), float(decay), float(then), 1.0 - (smoothing or 0.0),
            (smoothing or 0.0) * curvature, float(floor))
    return _launch(2, p, (triton.cdiv(n, BLOCK),), args, HESSIAN=hessian, **_terms(scale, decay, then))
