"""The fused sweep of Rademacher directions (format 2) on CUDA, as one Triton kernel.

The eager path of a sweep launches about 20 kernels per chunk (the counter words, their expansion to
±1 floats, the adds); here one launch per tensor computes, for each value v, its word
(splitmix64 of word v // 64, the integer arithmetic of `perturb.counter_words`), its sign (bit
31 − (v mod 32) of the word's low or high half, as `perturb.signs_from_words`) and the move, reading
and writing the tensor once. The float operations are the eager path's, in the same order:
x + (±a), x·d, x + (±b) (z = ±1, so a·z is exact and is a sign flip here), each rounded on its
own: the kernel is compiled with `enable_fp_fusion=False`, since x·d + b fused into one multiply-add
would round once where the CPU rounds twice. So the bits are the CPU's (tested on the CPU through
Triton's interpreter, `TRITON_INTERPRET=1`; on a GPU by `zotune bench gpu`).

Used for float32 CUDA tensors when Triton is importable (it comes with CUDA builds of torch);
everything else takes the eager path.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

BLOCK = 1024  # values per program


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    # (an integer argument equal to 1 would be specialised into a constant, and key.to() of a constant does
    # not compile: the counter words' key and offsets stay runtime values whatever they are)
    @triton.jit(do_not_specialize=["n", "key", "first_word"])
    def sweep(p_ptr, n, key, first_word, scale, decay, then,
              SCALE: tl.constexpr, DECAY: tl.constexpr, THEN: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        x = (offs // 64 + first_word + 1).to(tl.uint64) * 0x9E3779B97F4A7C15 + key.to(tl.uint64)
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        x = x ^ (x >> 31)
        r = offs % 64
        half = (x >> ((r // 32) * 32).to(tl.uint64)) & 0xFFFFFFFF  # int32 word 2j: low half (little-endian)
        negative = ((half >> (31 - r % 32).to(tl.uint64)) & 1) == 1
        v = tl.load(p_ptr + offs, mask=mask)
        if SCALE:
            v = v + tl.where(negative, -scale, scale)
        if DECAY:
            v = v * decay
        if THEN:
            v = v + tl.where(negative, -then, then)
        tl.store(p_ptr + offs, v, mask=mask)

    return sweep


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
    try:
        # Triton launches on the current device, not the tensor's: a tensor on cuda:1 enters cuda:1
        with torch.cuda.device(p.device) if p.device.type == "cuda" else contextlib.nullcontext():
            _kernel()[(triton.cdiv(n, BLOCK),)](
                flat, n, key, first_word, float(scale), float(decay), float(then),
                SCALE=scale != 0, DECAY=decay != 1, THEN=then != 0, BLOCK=BLOCK, enable_fp_fusion=False)
    except Exception as e:  # noqa: BLE001 -- a Triton that cannot build it (before any value is written)
        global _failed
        if _failed is not None:
            raise
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        warnings.warn(f"zotune: the Triton sweep kernel could not be built ({_failed}); sweeps take the eager "
                      f"path (the same bits, more kernel launches)", stacklevel=2)
        return False
    return True
