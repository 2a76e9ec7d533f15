"""The Triton kernels of `triton_sweep` (this module imports Triton: it is imported only when a CUDA
sweep first needs them). Module-level functions, since Triton's interpreter (TRITON_INTERPRET=1, the
CPU tests of their bits) resolves a kernel's helpers among its module's globals."""

import triton
import triton.language as tl


@triton.jit
def negative(key, offs):  # value `offs` of the draw keyed by `key`: −1? (perturb.counter_words, signs)
    x = (offs // 64 + 1).to(tl.uint64) * 0x9E3779B97F4A7C15 + key.to(tl.uint64)
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    x = x ^ (x >> 31)
    r = offs % 64
    half = (x >> ((r // 32) * 32).to(tl.uint64)) & 0xFFFFFFFF  # int32 word 2j: low half (little-endian)
    return ((half >> (31 - r % 32).to(tl.uint64)) & 1) == 1


@triton.jit
def step(v, z, scale, decay, then, SCALE, DECAY, THEN):  # (the flags arrive as constexprs)
    if SCALE:
        v = v + scale * z
    if DECAY:
        v = v * decay
    if THEN:
        v = v + then * z
    return v


# (an integer argument equal to 1 would be specialised into a constant, and key.to() of a constant does
# not compile: the counter words' key and offsets stay runtime values whatever they are)
@triton.jit(do_not_specialize=["n", "key", "first_word"])
def sweep(p_ptr, n, key, first_word, scale, decay, then,
          SCALE: tl.constexpr, DECAY: tl.constexpr, THEN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    z = tl.where(negative(key, offs + first_word * 64), -1.0, 1.0)  # ±1: scale·z is exact, a sign flip
    v = tl.load(p_ptr + offs, mask=mask)
    tl.store(p_ptr + offs, step(v, z, scale, decay, then, SCALE, DECAY, THEN), mask=mask)

@triton.jit(do_not_specialize=["m", "n", "key_u", "key_v"])
def low_rank(p_ptr, m, n, key_u, key_v, scale, decay, then, R: tl.constexpr,
             SCALE: tl.constexpr, DECAY: tl.constexpr, THEN: tl.constexpr, BLOCK: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = cols < n
    z = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(R):  # Z[a, b] = Σ_j U[a, j]·V[b, j]: ±1 products, an exact integer sum
        same = negative(key_u, a * R + j) == negative(key_v, cols * R + j)
        z = z + tl.where(same, 1.0, -1.0)
    offs = a * n + cols
    v = tl.load(p_ptr + offs, mask=mask)
    tl.store(p_ptr + offs, step(v, z, scale, decay, then, SCALE, DECAY, THEN), mask=mask)


@triton.jit(do_not_specialize=["n", "key"])
def hizoo(p_ptr, h_ptr, n, key, scale, decay, then, alpha, curvature, floor,
          SCALE: tl.constexpr, DECAY: tl.constexpr, THEN: tl.constexpr, HESSIAN: tl.constexpr, BLOCK: tl.constexpr):
    """HiZOO's sweep: p ← (p + scale·s)·decay + then·s with s = z/√H (a move: then = 0), and with HESSIAN
    the update of H, max(H·(1 − α) + α·d·z², floor) (z² = 1). As the CPU's eager path rounds: 1/√H
    correctly rounded, and each `p + c·s` one multiply-add (torch's addcmul_ and add_(alpha=) fuse
    them on CPUs with FMA, as a GPU's do)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    h = tl.load(h_ptr + offs, mask=mask, other=1.0)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(h))  # (CUDA's rsqrt is approximate)
    s = tl.where(negative(key, offs), -inv, inv)
    v = tl.load(p_ptr + offs, mask=mask)
    if SCALE:
        v = tl.fma(s, scale, v)
    if DECAY:
        v = v * decay
    if THEN:
        v = tl.fma(s, then, v)
    tl.store(p_ptr + offs, v, mask=mask)
    if HESSIAN:
        tl.store(h_ptr + offs, tl.maximum(h * alpha + curvature, floor), mask=mask)
