"""ZO methods: a registry of optimizers in the torch.optim style, each a small file.

Adding a method: write `methods/<name>.py` with the optimizer class, add its name to `METHODS`
with the options it accepts, and add a test against a naive reference of its update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zotune.config import ConfigError
from zotune.methods.perturb import DISTRIBUTIONS
from zotune.methods.zosgd import ZOSGD, NonFiniteLossError, StepRecord

METHODS = {"zosgd": ZOSGD}


@dataclass
class MethodConfig:
    """Which ZO method and its hyper-parameters."""

    name: str = "zosgd"
    lr: float = 5e-4
    eps: float = 1e-3
    weight_decay: float = 0.0
    n_directions: int = 1
    one_sided: bool = False
    distribution: str = "gaussian"  # or "rademacher": ±1 directions, cheaper to draw

    def __post_init__(self):
        if self.name not in METHODS:
            raise ConfigError(f"method.name={self.name!r} is not a known method; choose one of {', '.join(METHODS)}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"method.lr={self.lr} must be a finite number >= 0 (e.g. 1e-3)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"method.eps={self.eps} must be a finite number > 0 (e.g. 1e-3)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"method.weight_decay={self.weight_decay} must be a finite number >= 0")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"method.distribution={self.distribution!r} is not known; use one of {', '.join(DISTRIBUTIONS)}")
        if self.n_directions < 1:
            raise ConfigError(f"method.n_directions={self.n_directions} must be >= 1")

    @property
    def forwards_per_step(self) -> int:
        return self.n_directions + 1 if self.one_sided else 2 * self.n_directions


def list_methods() -> list[str]:
    return sorted(METHODS)


def make_optimizer(name: str, params, seed: int = 0, group=None, **options):
    """`make_optimizer("zosgd", model.parameters(), lr=1e-6, eps=1e-3)`; `group`: a `zotune.parallel.Group`."""
    cfg = MethodConfig(name=name, **options)
    return METHODS[name](params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay,
                         n_directions=cfg.n_directions, one_sided=cfg.one_sided, seed=seed,
                         distribution=cfg.distribution, group=group)


__all__ = ["METHODS", "MethodConfig", "NonFiniteLossError", "StepRecord", "ZOSGD", "list_methods", "make_optimizer"]
