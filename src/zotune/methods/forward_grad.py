"""Forward gradient (Baydin et al., 2022): the higher-memory baseline ZO methods are compared with.

One forward in forward-mode AD gives the exact directional derivative g = ∇L(θ)·z (a jvp), where
ZO-SGD estimates it by a finite difference of two forwards; the update is the same,
θ ← θ·(1 − lr·wd) − lr·g·z. The cost: z is held for every trainable tensor during the step (one
float per trained value, transient), the forward carries a tangent beside every activation, and
attention runs on SDPA's math kernel (the fused CPU and CUDA kernels have no forward-mode derivative).
The record holds g, so replay and resume are exact without any forward.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from zotune.config import ConfigError
from zotune.methods.registry import MethodConfig, register_method
from zotune.methods.zosgd import ZOSGD, StepRecord


class ForwardGradient(ZOSGD):
    streamable = False
    why_not_streamable = "its forward-mode jvp needs every trainable tensor's tangent at once"
    one_process = "method forward-grad runs in one process: drop parallel.data / parallel.perturb"

    @staticmethod
    def check_probes(n_directions: int, one_sided: bool) -> None:
        if n_directions != 1 or one_sided:
            raise ConfigError("forward-grad takes one direction and no finite difference: drop "
                              "n_directions and one_sided")

    @staticmethod
    def forwards(n_directions: int, one_sided: bool) -> int:
        return 1  # one forward in forward-mode AD (about 2-3x a plain forward's time)

    def __init__(self, params, **options):
        super().__init__(params, **options)
        if self.group.world > 1:
            raise ConfigError(self.one_process)

    def moves(self):
        return iter(())  # no probe moves: the jvp is taken at θ itself

    @torch.no_grad()  # not inference mode: it turns forward-mode AD off
    def step(self, closure, share: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        self.require_closure(closure)
        params = self.indexed()
        key = self.begin()
        with sdpa_kernel([SDPBackend.MATH]), fwAD.dual_level():
            for i, p in params:  # adding a zero with tangent z makes p itself dual, in place and unchanged
                p.add_(fwAD.make_dual(torch.zeros_like(p), self._directions.z(p, key.seed, 0, i)))
            primal, tangent = fwAD.unpack_dual(closure())
        if tangent is None:
            raise ConfigError("the closure's loss does not depend on the trainable parameters")
        loss, g = float(primal), float(tangent)
        self.check_finite([loss, g])
        self.update(params, self.finish(key, [loss], grads=[g]))
        return torch.tensor(loss)

    def update(self, indexed, record: StepRecord) -> None:
        groups, group_lr = self._group_of(), self._group_lrs(record)
        for i, p in indexed:
            group = groups[i]
            wd = group["weight_decay"] if p.dim() >= 2 else 0.0
            self.update_tensor(i, p, record, group_lr[id(group)], wd, restore=0.0)


register_method("forward-grad", MethodConfig, ForwardGradient)
