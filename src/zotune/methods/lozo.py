"""LOZO and LOZO-M (Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", ICLR 2025): ZO-SGD whose direction for a matrix is low-rank, Z = U·Vᵀ.

For a trainable tensor with two or more dimensions, seen as an m × n matrix (n: the product of the
other dimensions), direction k of a step is Z_k = U_k·Vᵀ with U_k (m × r) drawn afresh every step and
V (n × r) drawn once per window of `interval` steps (the paper's lazy sampling: within a window every
step moves in the same column space, so the steps add up there). Vectors (norms, biases) take
ZO-SGD's full-size z. The probes and the estimate are ZO-SGD's: g_k = (L(θ + εZ_k) − L(θ − εZ_k)) / 2ε,
θ ← θ·(1 − lr·wd) − lr·mean_k g_k·Z_k.

Nothing is stored: U_k is regenerated from the step's seed (as z is), V from the run's seed and the
window number, so the step log and replay stay ZO-SGD's. Z is made a row chunk at a time (at most
CHUNK values of scratch, like a sweep): with ±1 factors by one matrix product (its entries are exact
integers in any order of summation; on a float32 CPU tensor with r in {1, 2, 4}, the fused kernel of
`kernels` in one pass, the same bits), otherwise as r outer products summed in a fixed order, so every
path repeats the same roundings.

LOZO-M (`momentum` > 0): heavy-ball momentum kept in the low-rank space. Within a window all
estimates share V, so m_t = β·m_{t−1} + ĝ_t = N_t·Vᵀ with N_t = β·N_{t−1} + mean_k g_k·U_k: exact
momentum in m × r floats per matrix (r/n of the matrix; vectors keep a full buffer). At a new window
N is re-expressed in the new V by least squares, N ← N·V_oldᵀ·V·(VᵀV)⁺ (r × r pseudo-inverse), and the update
is θ ← θ·(1 − lr·wd) − lr·N·Vᵀ.

Differences from the authors' code (github.com/optsuite/LOZO): U and V follow `method.distribution`
(±1 by default; the paper's N(0, 1) with `distribution=gaussian`), drawn from zotune's seeded
counters instead of the global RNG; weight decay is applied to every tensor with two or more
dimensions (theirs: by parameter name); the momentum form above is zotune's (heavy-ball, as
`zosgd-momentum`, with a least-squares change of basis at a new window).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from zotune.config import ConfigError
from zotune.methods import kernels, triton_sweep
from zotune.methods.perturb import CHUNK, direction_seed, step_
from zotune.methods.registry import MethodConfig, register_method
from zotune.methods.zosgd import ZOSGD, StepKey, StepRecord

_LAZY = 0x4C4F5A4F  # "LOZO": keeps the seeds of V apart from every step's


@dataclass
class LOZOConfig(MethodConfig):
    """LOZO: rank-r directions for matrices, V shared by `interval` steps (the paper's r = 2, ν = 50).
    An entry of U·Vᵀ has variance r, so the step is about r times ZO-SGD's at the same lr: the default
    lr is ZO-SGD's divided by r."""

    lr: float = 2.5e-4
    rank: int = 2
    interval: int = 50
    momentum: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ConfigError(f"method.rank={self.rank} must be an integer >= 1 (e.g. 2)")
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ConfigError(f"method.interval={self.interval} must be an integer >= 1 (steps that share V, e.g. 50)")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"method.momentum={self.momentum} must be in [0, 1) (0 for lozo; lozo-m: e.g. 0.9)")


@dataclass
class LOZOMConfig(LOZOConfig):
    """LOZO-M: LOZO with heavy-ball momentum kept in the rank-r space (m × r floats per matrix); lr
    10x smaller than LOZO's, as zosgd-momentum's (a momentum of 0.9 sums about 10 steps)."""

    lr: float = 2.5e-5
    momentum: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if self.momentum == 0:
            raise ConfigError("method.momentum=0 is plain LOZO: use method.name=lozo, or a momentum in (0, 1)")


class LOZO(ZOSGD):
    @staticmethod
    def directions_depend_on_device(options: dict) -> bool:
        """With ±1 factors and r in {1, 2, 4}, every entry of U·Vᵀ is 0 or ±2^j, so scale·Z is exact and a
        device that fuses multiply-adds rounds every move and update the same: the same bits everywhere.
        Otherwise (r = 3, Gaussian factors, LOZO-M's real-valued N·Vᵀ) a run stays on its kind of device."""
        exact = options.get("distribution", "rademacher") == "rademacher" and options.get("rank", 2) in (1, 2, 4)
        return not exact or bool(options.get("momentum", 0.0))

    def __init__(self, params, rank: int = 2, interval: int = 50, momentum: float = 0.0, **options):
        super().__init__(params, rank=rank, interval=interval, momentum=momentum, **options)
        self.rank, self.interval, self.momentum = self.cfg.rank, self.cfg.interval, float(self.cfg.momentum)
        self._factors: dict[tuple, dict[tuple, torch.Tensor]] = {}  # ("u", StepKey) / ("v", window) -> factors
        self._factors_lock = threading.Lock()

    def state_floats(self) -> int:
        if not self.momentum:
            return 0
        return sum(p.shape[0] * self.rank if p.dim() >= 2 else p.numel() for p in self._params())

    # -- directions ---------------------------------------------------------------------------------

    @staticmethod
    def _shape(p: torch.Tensor) -> tuple[int, int]:
        return p.shape[0], p.numel() // max(1, p.shape[0])

    def _u(self, p: torch.Tensor, key: StepKey, k: int, i: int) -> torch.Tensor:
        m, _ = self._shape(p)
        return self._factor(p, ("u", key), (k, i), m, key.seed, k, i)

    def _v(self, p: torch.Tensor, window: int, i: int) -> torch.Tensor:
        _, n = self._shape(p)
        return self._factor(p, ("v", window), (0, i), n, direction_seed(self.seed ^ _LAZY, window, 0), 0, i)

    # A step's sweeps (+ε, −2ε, the restore with the update) all use its U, and a window's steps its V:
    # on the CPU the factors of the last two steps and windows are kept (the streaming engine applies
    # step t's update while step t + 1 probes), r·(m + n) floats a matrix, r/n + r/m of its size, rather
    # than drawn again at each sweep (a few small ops that cost more than the sweep itself). On an
    # accelerator they are drawn each time: a cache there would grow with the model's depth.
    _KEEP = 2

    def _factor(self, p: torch.Tensor, tag: tuple, index: tuple, rows: int, seed: int, k: int, i: int) -> torch.Tensor:
        def draw():
            return self._directions.z(torch.empty(rows, self.rank, dtype=p.dtype, device=p.device), seed, k, i)

        if p.device.type != "cpu":
            return draw()
        with self._factors_lock:  # the streaming engine's threads share the cache
            factor = self._factors.get(tag, {}).get(index)
        if factor is None or factor.shape[0] != rows or factor.dtype != p.dtype:
            factor = draw()
            with self._factors_lock:
                if tag not in self._factors:
                    same_kind = [t for t in self._factors if t[0] == tag[0]]  # oldest first
                    for t in same_kind[: len(same_kind) - self._KEEP + 1]:
                        del self._factors[t]
                    self._factors[tag] = {}
                self._factors[tag][index] = factor
        return factor

    def _window(self, step: int) -> int:
        return step // self.interval

    def _add_low_rank(self, p: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float, decay: float = 1.0,
                      then: float = 0.0, integers: bool = False) -> None:
        """p ← (p + scale·U·Vᵀ)·decay + then·U·Vᵀ, a row chunk at a time (one chunk of scratch).

        `integers`: U and V hold ±1, so every entry of U·Vᵀ is an exact small integer whatever the
        order of its sum, and one matrix product (BLAS) makes it; otherwise r outer products are
        summed in a fixed order, so every path and machine repeats the same roundings."""
        if not p.is_contiguous():  # checked here: a streamed block's stand-ins are not, its tensors are
            raise ConfigError("lozo needs contiguous parameters; call .contiguous() on them before training")
        m, n = self._shape(p)
        rows = p.view(m, n)
        if integers and self._fused(p):
            return kernels.low_rank_axpy(rows, u, v, scale, decay, then)
        step = max(1, CHUNK // max(1, n))
        for a in range(0, m, step):
            if integers:
                z = torch.mm(u[a: a + step], v.T)
            else:
                z = torch.outer(u[a: a + step, 0], v[:, 0])
                for j in range(1, self.rank):
                    z.addr_(u[a: a + step, j], v[:, j])
            step_(rows[a: a + step], z, scale, decay, then)

    def _fused(self, p: torch.Tensor) -> bool:
        """One pass of the fused kernel (the same bits) for a float32 CPU matrix when scale·Z is exact."""
        if not (self._directions.fused and self.rank in (1, 2, 4) and p.device.type == "cpu"
                and p.dtype == torch.float32):
            return False
        return kernels.available()

    def _on_device_kernel(self, p: torch.Tensor, key: StepKey, k: int, i: int, scale: float, decay: float,
                          then: float) -> bool:
        """The Triton kernel (one launch, U and V made inside it, the same bits) for a float32 CUDA matrix
        with ±1 factors of rank 1, 2 or 4; False: the caller takes the eager path."""
        d = self._directions
        if not (d.fused and d.distribution == "rademacher" and d.version == 2 and self.rank in (1, 2, 4)
                and triton_sweep.available(p) and p.numel() // p.shape[0] <= triton_sweep.MAX_COLUMNS):
            return False
        key_u = direction_seed(key.seed, k, i)  # the keys `_u` and `_v` draw their factors with
        key_v = direction_seed(direction_seed(self.seed ^ _LAZY, self._window(key.step), 0), 0, i)
        return triton_sweep.low_rank_axpy(p, self.rank, key_u, key_v, scale, decay, then)

    def add_z(self, p, key, k, i, scale, decay=1.0, then=0.0) -> None:
        if p.dim() < 2:
            return super().add_z(p, key, k, i, scale, decay, then)
        if self._on_device_kernel(p, key, k, i, scale, decay, then):
            return
        self._add_low_rank(p, self._u(p, key, k, i), self._v(p, self._window(key.step), i), scale, decay, then,
                           integers=self._directions.distribution == "rademacher")

    # -- LOZO-M's update ----------------------------------------------------------------------------

    def update_tensor(self, i: int, p: torch.Tensor, record: StepRecord, lr: float, wd: float, restore: float) -> None:
        if not self.momentum:
            return super().update_tensor(i, p, record, lr, wd, restore)
        key, n_dir = record.key, self.n_directions
        if restore:
            self.add_z(p, key, 0, i, restore)
        if wd:
            p.mul_(1 - lr * wd)
        state = self.state_of(i)
        if p.dim() < 2:  # a vector: heavy-ball momentum on its full ĝ (as zosgd-momentum, decay decoupled)
            ghat = torch.zeros_like(p)
            for k, g in enumerate(record.grads):
                self.add_z(ghat, key, k, i, g / n_dir)
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(self.momentum).add_(ghat)
            p.add_(buf, alpha=-lr)
            return
        window = self._window(key.step)
        v = self._v(p, window, i)
        coef = state.get("coefficients")
        if coef is None:
            coef = torch.zeros(self._shape(p)[0], self.rank, dtype=p.dtype, device=p.device)
        elif key.step > 0 and self._window(key.step - 1) != window:  # a new V: N in the new basis
            old = self._v(p, self._window(key.step - 1), i)
            coef = coef @ (old.T @ v) @ torch.linalg.pinv(v.T @ v)  # pinv: V may have equal columns
        coef.mul_(self.momentum)
        for k, g in enumerate(record.grads):
            coef.add_(self._u(p, key, k, i), alpha=g / n_dir)
        state["coefficients"] = coef
        self._add_low_rank(p, coef, v, -lr)


register_method("lozo", LOZOConfig, LOZO)
register_method("lozo-m", LOZOMConfig, LOZO)
