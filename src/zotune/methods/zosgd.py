"""ZO-SGD: MeZO's two-point SPSA with seed-regenerated directions, in the torch.optim style."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zotune.config import ConfigError
from zotune.methods.perturb import Directions


class NonFiniteLossError(RuntimeError):
    """A probe loss was NaN or infinite; the weights were restored before raising."""


@dataclass
class StepRecord:
    """Everything needed to replay one step without a forward: its seed, projected gradients, lrs."""

    step: int
    seed: int
    grads: list[float]
    losses: list[float]
    lrs: list[float] = field(default_factory=list)


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD with seeded perturbations (MeZO), `loss = opt.step(closure)`.

    The closure returns the loss at the current parameters and never calls backward; it runs under
    `torch.inference_mode()`. Per step, with one seed s and z_i regenerated from (s, k, i):
    two-sided: g_k = (L(θ+εz_k) − L(θ−εz_k)) / 2ε; one-sided: g_k = (L(θ+εz_k) − L(θ)) / ε;
    then θ_i ← θ_i − lr·(wd·θ_i + mean_k g_k·z_k,i), weight decay only for tensors with dim >= 2.

    Memory stays at inference level: the parameters are moved in place and z is one tensor's
    worth of scratch. `opt.last` holds the StepRecord of the latest step (seed, projected
    gradients, probe losses, lrs), enough to replay it with `apply_update`.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_directions: int = 1, one_sided: bool = False, seed: int = 0):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"lr={lr} must be a finite number >= 0 (e.g. 1e-6 for full fine-tuning)")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ConfigError(f"eps={eps} must be a finite number > 0 (e.g. 1e-3)")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ConfigError(f"weight_decay={weight_decay} must be a finite number >= 0")
        if not (isinstance(n_directions, int) and n_directions >= 1):
            raise ConfigError(f"n_directions={n_directions} must be an integer >= 1")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        for group in self.param_groups:
            if group["lr"] < 0 or group["weight_decay"] < 0:
                raise ConfigError("every parameter group needs lr >= 0 and weight_decay >= 0")
        self.eps = float(eps)
        self.n_directions = n_directions
        self.one_sided = one_sided
        self.seed = seed
        self.steps = 0
        self._seeds = torch.Generator().manual_seed(seed)
        self._directions = Directions()
        self.last: StepRecord | None = None

    # -- the parameters, in a fixed order: tensor i of the direction seeds -------------------------
    def _tensors(self) -> list[tuple[torch.Tensor, float, float]]:
        """(parameter, lr, weight decay or 0 for dim < 2) for every trainable tensor, in order."""
        return [(p, g["lr"], g["weight_decay"] if p.dim() >= 2 else 0.0)
                for g in self.param_groups for p in g["params"]]

    def _loss(self, closure: Callable[[], torch.Tensor]) -> float:
        with torch.inference_mode():
            return float(closure())

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ConfigError("ZO optimizers need a closure: opt.step(lambda: loss_fn(model, batch))")
        tensors = self._tensors()
        params = [p for p, _, _ in tensors]
        seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        eps, n = self.eps, self.n_directions
        losses: list[float] = []
        grads: list[float] = []
        moved: tuple[int, float] | None = None  # (direction, scale) currently applied to θ
        try:
            base = self._loss(closure) if self.one_sided else None
            if base is not None:
                losses.append(base)
            for k in range(n):
                self._directions.sweep(params, seed, k, eps)
                moved = (k, eps)
                plus = self._loss(closure)
                if self.one_sided:
                    losses.append(plus)
                    grads.append((plus - base) / eps)
                else:
                    self._directions.sweep(params, seed, k, -2 * eps)
                    moved = (k, -eps)
                    minus = self._loss(closure)
                    losses += [plus, minus]
                    grads.append((plus - minus) / (2 * eps))
                if n > 1 or not all(map(math.isfinite, losses)):
                    self._directions.sweep(params, seed, k, -moved[1])
                    moved = None
                if not all(map(math.isfinite, losses)):
                    raise NonFiniteLossError(
                        f"step {self.steps + 1}: loss is not finite ({', '.join(f'{x:g}' for x in losses)}); "
                        f"the weights were restored; lower lr or eps, or check the data")
        except BaseException:
            if moved is not None:  # e.g. Ctrl-C inside a forward: never leave θ perturbed
                self._directions.sweep(params, seed, moved[0], -moved[1])
            raise
        # With one direction the restore is fused with the update: z is regenerated once, not twice.
        for i, (p, lr, wd) in enumerate(tensors):
            z = None
            if moved is not None:
                z = self._directions.z(p, seed, 0, i)
                p.add_(z, alpha=-moved[1])
            if wd:
                p.mul_(1 - lr * wd)
            for k in range(n):
                z = z if n == 1 else self._directions.z(p, seed, k, i)
                p.add_(z, alpha=-lr * grads[k] / n)
        self.last = StepRecord(self.steps, seed, grads, losses, [g["lr"] for g in self.param_groups])
        self.steps += 1
        return torch.tensor(sum(losses) / len(losses))

    @torch.no_grad()
    def apply_update(self, record: StepRecord) -> None:
        """Apply a recorded step's update with no forward at all (replay)."""
        n = len(record.grads)
        lrs = record.lrs or [g["lr"] for g in self.param_groups]
        i = 0
        for group, lr in zip(self.param_groups, lrs):
            for p in group["params"]:
                wd = group["weight_decay"] if p.dim() >= 2 else 0.0
                if wd:
                    p.mul_(1 - lr * wd)
                for k in range(n):
                    p.add_(self._directions.z(p, record.seed, k, i), alpha=-lr * record.grads[k] / n)
                i += 1

    def state_dict(self):
        state = super().state_dict()
        state["zo"] = {"steps": self.steps, "seeds": self._seeds.get_state(), "seed": self.seed}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.steps, self.seed = zo["steps"], zo["seed"]
            self._seeds.set_state(zo["seeds"])
