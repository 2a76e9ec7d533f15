"""The ZO-SGD variants users compare (ZO-Bench): same probes and seeds, another update rule.

Each one changes only `update_tensor`: the probe moves are undone, ĝ = mean_k g_k z_k is
regenerated for one tensor at a time (one tensor's worth of scratch), and the rule applies it.
"""

from __future__ import annotations

import torch

from zotune.methods.zosgd import ZOSGD, StepRecord


class ZOMomentum(ZOSGD):
    """ZO-SGD with heavy-ball momentum: m ← β·m + ĝ + wd·θ; θ ← θ − lr·m (m: one float per value)."""

    state_per_value = 1

    def __init__(self, params, momentum: float = 0.9, **options):
        super().__init__(params, **options)
        self.momentum = momentum

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

    def __init__(self, params, beta1: float = 0.9, beta2: float = 0.999, adam_eps: float = 1e-8, **options):
        super().__init__(params, **options)
        self.beta1, self.beta2, self.adam_eps = beta1, beta2, adam_eps

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
