"""The registry of ZO methods: each method's file holds its config and ends with `register_method`.

`METHODS` maps a name to (its config class, its optimizer class). `MethodConfig` holds the options
every method shares and is the one place they are checked: an optimizer builds its config from its
options (`ZOSGD.__init__`), and `zotune train` builds it from the command line and files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from zotune.config import ConfigError, build
from zotune.methods.perturb import DISTRIBUTIONS, FORMAT

# name -> (its config, its optimizer). An optimizer's `state_floats()` says how many floats of state
# it keeps in all (0: memory stays at inference level).
METHODS: dict[str, tuple[type, type]] = {}

# The method of `zotune train` when none is named: LOZO, chosen from side-by-side measurements on two
# data sets at the same forward passes (docs/compare.md); the final norm alone, the default trainable,
# takes FZOO instead (`zotune.resolve.TRAINABLE_DEFAULTS`). Runs record their method in config.yaml.
DEFAULT_METHOD = "lozo"


def unknown_method(name) -> ConfigError:
    return ConfigError(f"method.name={name!r} is not a known method ({name!r} is not a method this zotune has); "
                       f"choose one of {', '.join(METHODS)}")


def not_a_walk(optimizer: type, used: str, instead: str) -> str | None:
    """Why `optimizer` cannot be `used` ("streamed"), with `instead` (what to do), or None when a step of
    it is a walk of its probes, then an update: what the streaming engine (block by block) and the HF
    Trainer (micro-batch by micro-batch) run."""
    if getattr(optimizer, "streamable", True):
        return None
    name = getattr(optimizer, "method_name", optimizer.__name__)
    return (f"method {name} cannot be {used}: its step is not a walk of probes ({optimizer.why_not_streamable}); "
            f"{instead}")


def require_walk(optimizer: type, used: str, instead: str) -> None:
    """Raise `not_a_walk`'s sentence, if it has one."""
    why = not_a_walk(optimizer, used, instead)
    if why:
        raise ConfigError(why)


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
    # AdaZeta's query schedule: with n_directions_max above n_directions, step t takes
    # min(ceil(n_directions · k^query_beta), n_directions_max) directions, k = 1 + t // query_every
    n_directions_max: int = 0
    query_beta: float = 0.5
    query_every: int = 100
    # A factor on lr for some forms of model.trainable, by the form as written or its kind, e.g.
    # {sensitive: 0.05} (a mask's deltas at 1/20 of the final norm's lr); the other forms take lr itself
    lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in METHODS:
            raise unknown_method(self.name)
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
        if not (isinstance(self.n_directions, int) and self.n_directions >= 1):
            raise ConfigError(f"method.n_directions={self.n_directions} must be an integer >= 1")
        METHODS[self.name][1].check_probes(self.n_directions, self.one_sided)  # before any work, in the method's words
        self._check_schedule()
        self.lr_scale = {str(form): _scale(form, factor) for form, factor in dict(self.lr_scale).items()}

    def _check_schedule(self) -> None:
        if not (isinstance(self.n_directions_max, int) and self.n_directions_max >= 0):
            raise ConfigError(f"method.n_directions_max={self.n_directions_max} must be an integer >= 0 (0: a fixed "
                              f"number of directions)")
        if not self.n_directions_max:
            return
        if self.n_directions_max < self.n_directions:
            raise ConfigError(f"method.n_directions_max={self.n_directions_max} is below method.n_directions="
                              f"{self.n_directions}: the schedule grows from n_directions up to n_directions_max")
        if not (isinstance(self.query_every, int) and self.query_every >= 1):
            raise ConfigError(f"method.query_every={self.query_every} must be an integer >= 1 (steps per stage of "
                              f"the query schedule, e.g. the steps of an epoch)")
        if not (math.isfinite(self.query_beta) and 0 < self.query_beta <= 1):
            raise ConfigError(f"method.query_beta={self.query_beta} must be in (0, 1] (sublinear growth, e.g. 0.5)")
        try:
            METHODS[self.name][1].check_probes(self.n_directions_max, self.one_sided)
        except ConfigError as e:
            raise ConfigError(f"method.n_directions_max={self.n_directions_max}: {self.name} cannot take that many "
                              f"directions ({e}); drop n_directions_max") from None

    def directions_at(self, step: int) -> int:
        """The directions of step `step` (0-based): n_directions, or the query schedule's count."""
        if self.n_directions_max <= self.n_directions:
            return self.n_directions
        k = 1 + step // self.query_every
        return min(math.ceil(self.n_directions * k ** self.query_beta - 1e-9), self.n_directions_max)

    def forwards_in(self, steps: int) -> int:
        """Forward passes of the first `steps` steps (a run's budget, with the query schedule if any)."""
        if self.n_directions_max <= self.n_directions:
            return steps * self.forwards_per_step
        count = METHODS[self.name][1].forwards
        return sum(count(self.directions_at(t), self.one_sided) for t in range(steps))

    def steps_within(self, forwards: float) -> int:
        """The most steps (at least 1) whose forward passes fit in `forwards`."""
        steps, used = 0, 0
        while True:
            used += METHODS[self.name][1].forwards(self.directions_at(steps), self.one_sided)
            if used > forwards:
                return max(1, steps)
            steps += 1

    @property
    def forwards_per_step(self) -> int:
        """Forward passes of one step, from the method's own count (`ZOSGD.forwards`)."""
        return METHODS[self.name][1].forwards(self.n_directions, self.one_sided)

    def options(self) -> dict:
        """The optimizer's keyword arguments: every field but the name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


def _scale(form, factor) -> float:
    try:
        value = float(factor)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"method.lr_scale: {form}={factor!r} must be a finite number >= 0 (a factor on method.lr, "
                          f"e.g. {{{form}: 0.05}})")
    return value


def register_method(name: str, config: type[MethodConfig], optimizer: type) -> None:
    """Make `name` a method: `config` checks its options, `optimizer` takes its steps. The first name an
    optimizer class is registered under is the one it validates its options as when built directly."""
    METHODS[name] = (config, optimizer)
    if "method_name" not in optimizer.__dict__:
        optimizer.method_name, optimizer.config = name, config


def method_config(values: dict) -> MethodConfig:
    """The config of the method `values["name"]` names (default `DEFAULT_METHOD`), built and checked from `values`."""
    name = values.get("name", DEFAULT_METHOD)
    if name not in METHODS:
        raise unknown_method(name)
    return build(METHODS[name][0], {**values, "name": name}, "method")


def list_methods() -> list[str]:
    return sorted(METHODS)


def make_optimizer(name: str, params, seed: int = 0, group=None, directions_format: int = FORMAT,
                   config: MethodConfig | None = None, **options):
    """`make_optimizer("zosgd", model.parameters(), lr=1e-6, eps=1e-3)`; `group`: a `zotune.parallel.Group`;
    `directions_format`: how z is drawn (a run folder's own, when resuming it); `config`: the method's
    options, checked already (`method_config`), instead of `options`."""
    if name not in METHODS:
        raise unknown_method(name)
    config_cls, optimizer_cls = METHODS[name]
    cfg = config if config is not None else config_cls(name=name, **options)
    return optimizer_cls(params, seed=seed, group=group, directions_format=directions_format, config=cfg)
