"""The ZO-SGD variants users compare (ZO-Bench): same probes and seeds, another update rule.

Each one changes only `update_tensor`: the probe moves are undone, ĝ = mean_k g_k z_k is
regenerated for one tensor at a time (one tensor's worth of scratch), and the rule applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zotune.config import ConfigError
from zotune.methods.registry import MethodConfig, register_method
from zotune.methods.zosgd import ZOSGD, StepRecord


@dataclass
class MomentumConfig(MethodConfig):
    momentum: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"method.momentum={self.momentum} must be in [0, 1) (e.g. 0.9)")


@dataclass
class AdamConfig(MethodConfig):
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"method.{key}={getattr(self, key)} must be in [0, 1) (e.g. 0.9, 0.999)")
        if not self.adam_eps > 0:
            raise ConfigError(f"method.adam_eps={self.adam_eps} must be > 0 (e.g. 1e-8)")


class ZOMomentum(ZOSGD):
    """ZO-SGD with heavy-ball momentum: m ← β·m + ĝ + wd·θ; θ ← θ − lr·m (m: one float per value)."""

    state_per_value = 1

    @staticmethod
    def directions_depend_on_device(options: dict) -> bool:
        return True  # m is real-valued: `add_(m, alpha=)` may contract to an FMA on CUDA (not yet measured)

    def __init__(self, params, momentum: float = 0.9, **options):
        super().__init__(params, momentum=momentum, **options)
        self.momentum = self.cfg.momentum

    def update_tensor(self, i, p, record: StepRecord, lr, wd, restore) -> None:
        ghat = self.restore_and_estimate(i, p, record, restore)
        if wd:
            ghat.add_(p, alpha=wd)
        state = self.state_of(i)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m = state["momentum_buffer"]
        m.mul_(self.momentum).add_(ghat)
        p.add_(m, alpha=-lr)


class ZOAdam(ZOSGD):
    """ZO-Adam: Adam's moments of ĝ, bias-corrected, decoupled weight decay (m, v: two floats per value)."""

    state_per_value = 2

    @staticmethod
    def directions_depend_on_device(options: dict) -> bool:
        # addcmul_ / addcdiv_ contract to FMAs in CUDA kernels, and sqrt may round otherwise: until a GPU
        # shows CPU and CUDA give the same bits, a run continues (and replays) on the kind it started on
        return True

    def __init__(self, params, beta1: float = 0.9, beta2: float = 0.999, adam_eps: float = 1e-8, **options):
        super().__init__(params, beta1=beta1, beta2=beta2, adam_eps=adam_eps, **options)
        self.beta1, self.beta2, self.adam_eps = self.cfg.beta1, self.cfg.beta2, self.cfg.adam_eps

    def update_tensor(self, i, p, record: StepRecord, lr, wd, restore) -> None:
        ghat = self.restore_and_estimate(i, p, record, restore)
        state = self.state_of(i)
        if "exp_avg" not in state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m.mul_(self.beta1).add_(ghat, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(ghat, ghat, value=1 - self.beta2)
        if wd:
            p.mul_(1 - lr * wd)
        denom = (v / (1 - self.beta2 ** t)).sqrt_().add_(self.adam_eps)
        p.addcdiv_(m, denom, value=-lr / (1 - self.beta1 ** t))


class ZOSign(ZOSGD):
    """ZO-sign: θ ← θ·(1 − lr·wd) − lr·sign(ĝ): every value moves by lr (no state)."""

    def update_tensor(self, i, p, record: StepRecord, lr, wd, restore) -> None:
        ghat = self.restore_and_estimate(i, p, record, restore)
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(ghat.sign_(), alpha=-lr)


register_method("zosgd-momentum", MomentumConfig, ZOMomentum)
register_method("zosgd-sign", MethodConfig, ZOSign)
register_method("zoadam", AdamConfig, ZOAdam)
