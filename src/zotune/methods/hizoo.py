"""HiZOO: ZO-SGD preconditioned by a diagonal Hessian estimate H (one float of state per value).

Three forwards a step: L(θ), L(θ + εz/√H), L(θ − εz/√H). With g = (L+ − L−)/2ε and the second
difference d = |L+ + L− − 2L(θ)| / 2ε², the update is θ ← θ − lr·g·z/√H, then
H ← (1 − α)·H + α·d·z² (kept above `hessian_floor`). H starts at 1, so the first step is ZO-SGD's.
The record holds [g, d]: replay and resume redo both updates bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zotune.config import ConfigError
from zotune.methods import triton_sweep
from zotune.methods.perturb import direction_seed
from zotune.methods.registry import MethodConfig, register_method
from zotune.methods.zosgd import ZOSGD, StepRecord


@dataclass
class HiZOOConfig(MethodConfig):
    hessian_smoothing: float = 1e-8
    hessian_floor: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.hessian_smoothing <= 1:
            raise ConfigError(f"method.hessian_smoothing={self.hessian_smoothing} must be in [0, 1] (e.g. 1e-8)")
        if not self.hessian_floor > 0:
            raise ConfigError(f"method.hessian_floor={self.hessian_floor} must be > 0 (e.g. 1e-8)")


class HiZOO(ZOSGD):
    state_per_value = 1

    @staticmethod
    def directions_depend_on_device(options: dict) -> bool:
        # its CUDA kernel rounds as a CPU with FMA does (tested in Triton's interpreter), its eager path does
        # not (CUDA's rsqrt is approximate); not yet measured on a GPU (`zotune bench gpu`: hizoo_bits)
        return True

    @staticmethod
    def check_probes(n_directions: int, one_sided: bool) -> None:
        if n_directions != 1 or one_sided:
            raise ConfigError("hizoo uses one two-sided direction and a reference forward: drop n_directions "
                              "and one_sided")

    def __init__(self, params, hessian_smoothing: float = 1e-8, hessian_floor: float = 1e-8, **options):
        super().__init__(params, hessian_smoothing=hessian_smoothing, hessian_floor=hessian_floor, **options)
        self.alpha, self.floor = self.cfg.hessian_smoothing, self.cfg.hessian_floor

    @staticmethod
    def forwards(n_directions: int, one_sided: bool) -> int:
        return 3  # L(θ), L(θ + εz), L(θ − εz)

    def moves(self):
        yield None, 0.0, True  # L(θ)
        yield 0, self.eps, True
        yield 0, -2 * self.eps, True

    def estimate(self, losses: list[float]) -> list[float]:
        base, plus, minus = losses
        return [(plus - minus) / (2 * self.eps), abs(plus + minus - 2 * base) / (2 * self.eps ** 2)]

    def _hessian(self, i: int, p: torch.Tensor) -> torch.Tensor:
        state = self.state_of(i)
        if "hessian" not in state:
            state["hessian"] = torch.ones_like(p)
        return state["hessian"]

    @staticmethod
    def _same_chunk(t: torch.Tensor, p: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
        start = (piece.data_ptr() - p.data_ptr()) // p.element_size()
        return t.view(-1)[start: start + piece.numel()]

    def _kernel(self, p: torch.Tensor, h: torch.Tensor) -> bool:
        """Whether a sweep of p takes the Triton kernel: float32 CUDA tensors, counter-based signs."""
        d = self._directions
        return (d.fused and d.distribution == "rademacher" and d.version == 2 and triton_sweep.available(p)
                and triton_sweep.available(h))

    def move(self, indexed, key, k: int, scale: float) -> None:
        """θ_i += scale · z_i / √H_i, chunk by chunk (one launch on CUDA)."""
        for i, p in indexed:
            h = self._hessian(i, p)
            if self._kernel(p, h) and triton_sweep.hessian_axpy(p, h, direction_seed(key.seed, k, i), scale):
                continue
            self._directions.apply(p, key.seed, k, i, lambda piece, z, p=p, h=h: piece.addcmul_(
                z, self._same_chunk(h, p, piece).rsqrt(), value=scale))

    def update_tensor(self, i, p, record: StepRecord, lr, wd, restore) -> None:
        g, d = record.grads
        h = self._hessian(i, p)
        if self._kernel(p, h) and triton_sweep.hessian_axpy(
                p, h, direction_seed(record.seed, 0, i), restore, 1 - lr * wd if wd else 1.0, -lr * g,
                smoothing=self.alpha, curvature=d, floor=self.floor):
            return

        def fused(piece, z):
            hc = self._same_chunk(h, p, piece)
            scaled = z * hc.rsqrt()
            piece.add_(scaled, alpha=restore)
            if wd:
                piece.mul_(1 - lr * wd)
            piece.add_(scaled, alpha=-lr * g)
            hc.mul_(1 - self.alpha).addcmul_(z, z, value=self.alpha * d).clamp_(min=self.floor)
        self._directions.apply(p, record.seed, 0, i, fused)


register_method("hizoo", HiZOOConfig, HiZOO)
