"""ZO-conservative (ZO-Bench): after the ZO-SGD probes, keep the best of θ, θ − u and θ + u (u = lr·g·z).

Five forwards a step: L(θ ± εz), then L(θ), L(θ − u), L(θ + u). The choice is logged with the
projected gradient (grads = [g, c], c in {0, +1, −1}: θ, θ − u, θ + u), and `update` repeats the
exact moves of the step, so replay and resume stay bit for bit.
"""

from __future__ import annotations

import torch

from zotune.config import ConfigError
from zotune.methods.registry import MethodConfig, register_method
from zotune.methods.zosgd import ZOSGD, StepRecord

_CHOICES = (0.0, 1.0, -1.0)  # θ, θ − u, θ + u


class ZOConservative(ZOSGD):
    """ZO-SGD that never takes a step that makes the batch loss worse (one direction, two-sided)."""

    streamable = False  # its extra forwards come after the update: not a walk of probe moves
    why_not_streamable = "its extra forwards come after its update, which the streaming engine does not schedule"

    @staticmethod
    def check_probes(n_directions: int, one_sided: bool) -> None:
        if n_directions != 1 or one_sided:
            raise ConfigError("zosgd-conservative uses one two-sided direction: drop n_directions and one_sided")

    @staticmethod
    def forwards(n_directions: int, one_sided: bool) -> int:
        return 5  # ZO-SGD's 2 probes, then L(θ), L(θ − u), L(θ + u)

    def __init__(self, params, **options):
        super().__init__(params, **options)
        if any(g["weight_decay"] for g in self.param_groups):
            raise ConfigError("zosgd-conservative compares raw candidate points: use weight_decay=0")

    def _scaled_move(self, params, key, factor: float) -> None:
        """θ_i += factor · lr_i · z_i: the u-moves (factor ±g), with each group's lr."""
        groups = self._group_of()
        for i, p in params:
            self.add_z(p, key, 0, i, factor * groups[i]["lr"])

    @torch.no_grad()
    def step(self, closure, share: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        self.require_closure(closure)
        params = self.indexed()
        plan = self.start_step(share)
        key = plan.key
        losses = self._probe(closure, params, plan, share)  # the walk of ZO-SGD's two probes
        g = self.estimate(losses)[0]
        self.move(params, key, 0, self.eps)  # back to θ (up to rounding, as in every ZO step)
        at = 0.0  # where θ is, in multiples of u
        try:
            extra = [self._loss(closure) if share > 0 else 0.0]  # L(θ)
            self._scaled_move(params, key, -g)
            at = -1.0
            extra.append(self._loss(closure) if share > 0 else 0.0)  # L(θ − u)
            self._scaled_move(params, key, 2 * g)
            at = 1.0
            extra.append(self._loss(closure) if share > 0 else 0.0)  # L(θ + u)
            extra = self.group.sum([x * share for x in extra])  # every data rank ran all three on its rows
            self.check_finite(extra)
        except BaseException:  # back to θ before raising
            if at:
                self._scaled_move(params, key, -g * at)
            raise
        choice = _CHOICES[min(range(3), key=extra.__getitem__)]
        self._settle(params, key, g, choice)
        self.finish(key, losses + extra, grads=[g, choice])
        return torch.tensor(sum(losses) / len(losses))

    def _settle(self, params, key, g: float, choice: float) -> None:
        """From θ + u, go to the chosen point (the same moves in the step and in replay)."""
        if choice != -1.0:
            self._scaled_move(params, key, -g * (1.0 + choice))

    def update(self, indexed, record: StepRecord) -> None:
        """Replay: from the probes' end state, the step's own moves to the chosen point."""
        g, choice = record.grads
        key = record.key
        self.move(indexed, key, 0, self.eps)
        self._scaled_move(indexed, key, -g)
        self._scaled_move(indexed, key, 2 * g)
        self._settle(indexed, key, g, choice)


register_method("zosgd-conservative", MethodConfig, ZOConservative)
