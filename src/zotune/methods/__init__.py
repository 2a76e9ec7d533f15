"""ZO methods: a registry of optimizers in the torch.optim style, each a small file.

Adding a method: write `methods/<name>.py` with the optimizer class, add its name to `METHODS`
with the options it accepts, and add a test against a naive reference of its update.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from zotune.config import ConfigError
from zotune.methods.conservative import ZOConservative
from zotune.methods.forward_grad import ForwardGradient
from zotune.methods.fzoo import FZOO
from zotune.methods.hizoo import HiZOO
from zotune.methods.lozo import LOZO
from zotune.methods.sparse import SparseMeZO
from zotune.methods.perturb import DISTRIBUTIONS, FORMAT
from zotune.methods.variants import ZOAdam, ZOMomentum, ZOSign
from zotune.methods.zosgd import ZOSGD, NonFiniteLossError, StepKey, StepRecord


@dataclass
class MethodConfig:
    """Which ZO method and the hyper-parameters every method shares (ZO-SGD and ZO-sign use only these)."""

    name: str = "zosgd"
    lr: float = 5e-4
    eps: float = 1e-3
    weight_decay: float = 0.0
    n_directions: int = 1
    one_sided: bool = False
    distribution: str = "rademacher"  # ±1 directions (SPSA's classic choice, cheap to draw), or "gaussian" (MeZO's)

    def __post_init__(self):
        if self.name not in METHODS:
            raise ConfigError(f"method.name={self.name!r} is not a known method; choose one of {', '.join(METHODS)}")
        if not isinstance(self, METHODS[self.name][0]):
            raise ConfigError(f"method {self.name!r} is configured by {METHODS[self.name][0].__name__}; "
                              f"use method_config() or make_optimizer()")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"method.lr={self.lr} must be a finite number >= 0 (e.g. 1e-3)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"method.eps={self.eps} must be a finite number > 0 (e.g. 1e-3)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"method.weight_decay={self.weight_decay} must be a finite number >= 0")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"method.distribution={self.distribution!r} is not known; use one of "
                              f"{', '.join(DISTRIBUTIONS)}")
        if self.n_directions < 1:
            raise ConfigError(f"method.n_directions={self.n_directions} must be >= 1")
        METHODS[self.name][1].check_probes(self.n_directions, self.one_sided)  # before any work, in the method's words

    @property
    def forwards_per_step(self) -> int:
        return self.n_directions + 1 if self.one_sided else 2 * self.n_directions

    def options(self) -> dict:
        """The optimizer's keyword arguments: every field but the name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


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


@dataclass
class ConservativeConfig(MethodConfig):
    @property
    def forwards_per_step(self) -> int:
        return 5


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

    @property
    def forwards_per_step(self) -> int:
        return 3


@dataclass
class SparseConfig(MethodConfig):
    sparsity: float = 0.75  # the fraction of each tensor's values left out: the largest in magnitude

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"method.sparsity={self.sparsity} must be in [0, 1) (e.g. 0.75)")


@dataclass
class FZOOConfig(MethodConfig):
    """FZOO's defaults: 8 one-sided Rademacher directions (the authors' N); lr 1e-2, the better of the
    two measured on the last 2 blocks (docs/compare.md). On the final norm alone it takes lr 0.2
    (`zotune.train.TRAINABLE_DEFAULTS`)."""

    lr: float = 1e-2
    n_directions: int = 8
    one_sided: bool = True


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


@dataclass
class ForwardGradConfig(MethodConfig):
    @property
    def forwards_per_step(self) -> int:
        return 1  # one forward in forward-mode AD (about 2-3x a plain forward's time)


# name -> (its config, its optimizer). An optimizer's `state_floats()` says how many floats of state
# it keeps in all (0: memory stays at inference level).
METHODS = {
    "zosgd": (MethodConfig, ZOSGD),
    "zosgd-momentum": (MomentumConfig, ZOMomentum),
    "zosgd-sign": (MethodConfig, ZOSign),
    "zoadam": (AdamConfig, ZOAdam),
    "zosgd-conservative": (ConservativeConfig, ZOConservative),
    "hizoo": (HiZOOConfig, HiZOO),
    "forward-grad": (ForwardGradConfig, ForwardGradient),
    "sparse-mezo": (SparseConfig, SparseMeZO),
    "fzoo": (FZOOConfig, FZOO),
    "lozo": (LOZOConfig, LOZO),
    "lozo-m": (LOZOMConfig, LOZO),
}


# The method of `zotune train` when none is named: LOZO, chosen from side-by-side measurements on two
# data sets at the same forward passes (docs/compare.md); the final norm alone, the default trainable,
# takes FZOO instead (`zotune.train.TRAINABLE_DEFAULTS`). Runs record their method in config.yaml.
DEFAULT_METHOD = "lozo"


def method_config(values: dict) -> MethodConfig:
    """The config of the method `values["name"]` names (default `DEFAULT_METHOD`), built and checked from `values`."""
    from zotune.config import build

    name = values.get("name", DEFAULT_METHOD)
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not a known method; choose one of {', '.join(METHODS)}")
    return build(METHODS[name][0], {**values, "name": name}, "method")


def list_methods() -> list[str]:
    return sorted(METHODS)


def make_optimizer(name: str, params, seed: int = 0, group=None, directions_format: int = FORMAT, **options):
    """`make_optimizer("zosgd", model.parameters(), lr=1e-6, eps=1e-3)`; `group`: a `zotune.parallel.Group`;
    `directions_format`: how z is drawn (a run folder's own, when resuming it)."""
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not a known method; choose one of {', '.join(METHODS)}")
    config_cls, optimizer_cls = METHODS[name]
    cfg = config_cls(name=name, **options)
    return optimizer_cls(params, seed=seed, group=group, directions_format=directions_format, **cfg.options())


__all__ = ["DEFAULT_METHOD", "METHODS", "FZOO", "FZOOConfig", "AdamConfig", "ConservativeConfig", "ForwardGradConfig", "ForwardGradient", "LOZO", "LOZOConfig", "LOZOMConfig", "SparseConfig", "SparseMeZO", "HiZOO", "HiZOOConfig", "ZOConservative", "MethodConfig", "MomentumConfig", "NonFiniteLossError", "StepKey", "StepRecord", "ZOAdam",
           "ZOMomentum", "ZOSGD", "ZOSign", "list_methods", "make_optimizer", "method_config"]
