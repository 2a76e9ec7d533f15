"""ZO-SGD: MeZO's two-point SPSA with seed-regenerated directions, in the torch.optim style."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from zotune.config import ConfigError
from zotune.methods.perturb import FORMAT, FORMATS, Directions
from zotune.methods.registry import MethodConfig, register_method
from zotune.parallel import SOLO


class NonFiniteLossError(RuntimeError):
    """A probe loss was NaN or infinite; the weights were restored before raising."""


@dataclass(frozen=True)
class StepKey:
    """Which step a move belongs to: its number (0-based) and its seed. Directions are regenerated
    from the key alone; a method whose directions span several steps (LOZO's lazy V) uses the number."""

    step: int
    seed: int


@dataclass
class StepRecord:
    """Everything needed to replay one step without a forward: its seed, projected gradients, lrs."""

    step: int
    seed: int
    grads: list[float]
    losses: list[float]
    lrs: list[float] = field(default_factory=list)

    @property
    def key(self) -> StepKey:
        return StepKey(self.step, self.seed)


@dataclass(frozen=True)
class StepPlan:
    """A step about to be taken: its key, how many probes it has, which of them this process runs, and
    whether its walk ends at the last probe's point (no move follows: the update restores from there)."""

    key: StepKey
    n_probes: int
    owned: list[int]
    ends_on_probe: bool


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD with seeded perturbations (MeZO), `loss = opt.step(closure)`.

    The closure returns the loss at the current parameters and never calls backward; it runs under
    `torch.inference_mode()`. Per step, with one seed s and z_i regenerated from (s, k, i):
    two-sided: g_k = (L(θ+εz_k) − L(θ−εz_k)) / 2ε; one-sided: g_k = (L(θ+εz_k) − L(θ)) / ε;
    z with independent ±1 entries by default (Rademacher, SPSA's classic choice: a fused one-pass
    kernel on CPU), or z ~ N(0, I) with `distribution="gaussian"` (MeZO's choice; ~3x dearer to draw);
    then θ_i ← θ_i − lr·(wd·θ_i + mean_k g_k·z_k,i), weight decay only for tensors with dim >= 2.

    Memory stays at inference level: the parameters are moved in place and z is one tensor's
    worth of scratch. `directions_format` picks how z is drawn (`perturb.FORMAT` for new runs; a
    run folder records its own, so older runs replay with theirs). With a `group` (zotune.parallel), each
    rank runs the forwards of its own probes on its own rows and one all-reduce of the probe losses gives
    every rank the same update. `opt.last` holds the StepRecord of the latest step (seed, projected
    gradients, probe losses, lrs), enough to redo it bit for bit with `replay`.

    The method contract (docs/adding-a-method.md): a method is this class with some of four members
    replaced: `moves()` (the probes: where θ goes and where a forward runs), `add_z` (what direction k
    of tensor i is), `estimate(losses)` (the projected gradients) and `update_tensor` (the rule). Every
    caller (this `step`, the streaming engine block by block, the HF Trainer per micro-batch, replay)
    runs the probes through the one `walk`, and applies a finished step through `update`.
    """

    state_per_value = 0  # floats of optimizer state per trainable value: memory stays at inference level
    streamable = True  # a step is a walk of `moves()` then `update`: the streaming engine can run it
    one_process = None  # or why a method cannot split its steps over processes (zotune.combinations)

    @staticmethod
    def check_probes(n_directions: int, one_sided: bool) -> None:
        """Raise when a method cannot take these probes (its config calls this too, before any work)."""

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 n_directions: int = 1, one_sided: bool = False, seed: int = 0, distribution: str = "rademacher",
                 group=None, directions_format: int = FORMAT, config: MethodConfig | None = None, **method_options):
        # `config`: the method's options, checked (`make_optimizer`); else they are checked here, once
        if config is None:
            config = self.config(name=self.method_name, lr=lr, eps=eps, weight_decay=weight_decay,
                                 n_directions=n_directions, one_sided=one_sided, distribution=distribution,
                                 **method_options)
        self.cfg = config
        lr, eps, weight_decay, distribution = config.lr, config.eps, config.weight_decay, config.distribution
        n_directions, one_sided = config.n_directions, config.one_sided
        if directions_format not in FORMATS:
            raise ConfigError(f"direction format {directions_format} is newer than this zotune (it knows "
                              f"{', '.join(map(str, FORMATS))}); upgrade zotune to read this run")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        for g in self.param_groups:
            if g["lr"] < 0 or g["weight_decay"] < 0:
                raise ConfigError("every parameter group needs lr >= 0 and weight_decay >= 0")
        self.eps = float(eps)
        self.n_directions = n_directions
        self.one_sided = one_sided
        self.seed = seed
        self.steps = 0
        self._seeds = torch.Generator().manual_seed(seed)
        self._directions = Directions(distribution, version=directions_format)
        self.last: StepRecord | None = None
        # Per-tensor state by tensor index i (momentum, moments, Hessian, a step's mask): a streaming
        # engine moves tensor i's entry between the device and its tier with the block that holds it.
        self.tensor_state: dict[int, dict] = {}
        self.group = SOLO if group is None else group  # a zotune.parallel.Group: with one process nothing is sent

    @staticmethod
    def directions_depend_on_device(options: dict) -> bool:
        """Whether a step with these options rounds differently on another kind of device beyond what
        `perturb.device_dependent` says of its z (then a run continues only on the kind it started on)."""
        return False

    def state_floats(self) -> int:
        """Floats of per-tensor state this optimizer keeps in all (0: memory stays at inference level)."""
        return self.state_per_value * sum(p.numel() for p in self._params())

    def state_of(self, i: int) -> dict:
        """The state of tensor i (created empty)."""
        return self.tensor_state.setdefault(i, {})

    def _params(self) -> list[torch.Tensor]:
        """Every trainable tensor in a fixed order: tensor i of the direction seeds."""
        return [p for g in self.param_groups for p in g["params"]]

    def indexed(self, tensors=None) -> list[tuple[int, torch.Tensor]]:
        """(tensor index i, tensor) for every trainable tensor, or for the given subset of them.

        The index fixes the direction seeds, so a subset moved on its own (a streamed block)
        gets exactly the values it gets in a whole-model step.
        """
        pairs = list(enumerate(self._params()))
        if tensors is None:
            return pairs
        wanted = {id(t) for t in tensors}
        return [(i, p) for i, p in pairs if id(p) in wanted]

    def _group_of(self) -> list[dict]:
        return [g for g in self.param_groups for _ in g["params"]]

    def _loss(self, closure: Callable[[], torch.Tensor]) -> float:
        with torch.inference_mode():
            return float(closure())

    def moves(self):
        """The in-place moves of one step, in order: (direction, scale, probe after it?).

        Training and replay walk the same list, so replay repeats every rounding of training.
        With one direction the last move (the restore) is left to `update`, which fuses it.
        """
        eps, n = self.eps, self.n_directions
        if self.one_sided:
            yield None, 0.0, True
        for k in range(n):
            yield k, eps, True
            if not self.one_sided:
                yield k, -2 * eps, True
            if n > 1:
                yield k, eps if not self.one_sided else -eps, False

    @property
    def n_probes(self) -> int:
        """Forwards of one step's probes (the losses `estimate` takes)."""
        return sum(1 for *_, probe in self.moves() if probe)

    @staticmethod
    def forwards(n_directions: int, one_sided: bool) -> int:
        """Forward passes of one step with these options (what a run's budget counts): its probes."""
        return n_directions + 1 if one_sided else 2 * n_directions

    def walk(self, indexed: list[tuple[int, torch.Tensor]], key: StepKey,
             offsets: dict[int, float] | None = None) -> Iterator[int]:
        """The one walk of a step's probes: apply the moves of `moves()` to `indexed` in order and
        yield r where probe r's forward runs (θ is then where that forward must see it).

        The whole-model step, the streaming engine (block by block), the HF Trainer (micro-batch by
        micro-batch) and replay all walk with this, so they repeat each other's roundings. `offsets`,
        when given, collects direction -> the scale applied so far (for `undo` when a step fails).
        """
        self.at_step(key.step)
        r = 0
        for k, scale, probe in self.moves():
            if k is not None:
                self.move(indexed, key, k, scale)
                if offsets is not None:
                    offsets[k] = offsets.get(k, 0.0) + scale
            if probe:
                yield r
                r += 1

    def estimate(self, losses: list[float]) -> list[float]:
        """The projected gradients of a step from its probe losses (what the step log keeps)."""
        eps = self.eps
        if self.one_sided:
            return [(plus - losses[0]) / eps for plus in losses[1:]]
        return [(losses[2 * k] - losses[2 * k + 1]) / (2 * eps) for k in range(len(losses) // 2)]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor], share: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        self.require_closure(closure)
        params = self.indexed()
        plan = self.start_step(share)
        losses = self._probe(closure, params, plan, share)
        record = self.finish(plan.key, losses)
        self.update(params, record)
        return torch.tensor(sum(losses) / len(losses))

    def require_closure(self, closure) -> None:
        if closure is None:
            raise ConfigError(f"{self.method_name} needs a closure: opt.step(lambda: loss_fn(model, batch))")

    def _probe(self, closure, params, plan: StepPlan, share: float) -> list[float]:
        """Walk the probes, running this process's forwards: every probe loss. On any error θ is restored."""
        mine: dict[int, float] = {}  # probe index -> loss, for the probes this process runs
        offsets: dict[int, float] = {}  # direction -> scale currently applied to θ
        try:
            for r in self.walk(params, plan.key, offsets):
                if r in plan.owned:
                    mine[r] = self._loss(closure)
                    self.check_finite(list(mine.values()))
            return self.gather(mine, plan.n_probes, share)
        except BaseException:  # a non-finite loss, or e.g. Ctrl-C inside a forward: never leave θ perturbed
            self.undo(params, plan.key, offsets)
            raise

    def start_step(self, share: float = 1.0) -> StepPlan:
        """The plan of the next step (its seed drawn here); `share`: this rank's share of the batch rows."""
        key, n = self.begin(), self.n_probes
        return StepPlan(key, n, [r for r in range(n) if self.runs_probe(r, share)], list(self.moves())[-1][2])

    def end_step(self, plan: StepPlan, mine: dict[int, float], share: float = 1.0) -> StepRecord:
        """The record of a step whose probes ran (`mine`: this process's losses by probe): every probe's
        loss gathered and checked, and the step counts from here."""
        self.check_finite(list(mine.values()))
        return self.finish(plan.key, self.gather(mine, plan.n_probes, share))

    # The pieces of a step, shared by the whole-model step above, `replay`, the HF Trainer and the
    # streaming engine (which walks them block by block): every caller repeats the same roundings.

    def begin(self) -> StepKey:
        """The key of the next step (its seed drawn here)."""
        self.at_step(self.steps)
        return StepKey(self.steps, self._next_seed())

    def at_step(self, step: int) -> int:
        """Set and return `n_directions` for step `step` (0-based): fixed, or the query schedule's. Every
        piece of a step (its walk, its update, a replay) sets it from the step it belongs to, so a
        streamed block catching up on step t while step t + 1 walks gets each step's own count."""
        self.n_directions = self.cfg.directions_at(step)
        return self.n_directions

    def add_z(self, p: torch.Tensor, key: StepKey, k: int, i: int, scale: float, decay: float = 1.0,
              then: float = 0.0) -> None:
        """p ← (p + scale·z)·decay + then·z in place, z direction k of tensor i in step `key`, regenerated
        chunk by chunk (a term of 0, or a decay of 1, is skipped). What a direction is: a method with
        other directions (LOZO's low-rank ones) replaces this."""
        self._directions.add(p, key.seed, k, i, scale, decay, then)

    def move(self, indexed: list[tuple[int, torch.Tensor]], key: StepKey, k: int, scale: float) -> None:
        """θ_i += scale · z_k,i for the given (i, tensor) pairs, in place."""
        for i, p in indexed:
            self.add_z(p, key, k, i, scale)

    def undo(self, indexed: list[tuple[int, torch.Tensor]], key: StepKey, offset: dict[int, float]) -> None:
        """Take back the moves of a step that will not finish (equal to θ up to float rounding)."""
        for k, applied in offset.items():
            if applied:
                self.move(indexed, key, k, -applied)

    def runs_probe(self, r: int, share: float = 1.0) -> bool:
        """Whether this process runs probe r's forward: when r is this rank's probe and this rank has
        rows of the batch (`share` > 0); always in one process."""
        return share > 0 and self.group.owns_probe(r)

    def gather(self, mine: dict[int, float], n_probes: int, share: float = 1.0) -> list[float]:
        """All probe losses: every rank's (one all-reduce; in one process, its own)."""
        losses = self.group.probe_losses(mine, n_probes, share)
        self.check_finite(losses)
        return losses

    def check_finite(self, losses: list[float]) -> None:
        if not all(math.isfinite(x) for x in losses):
            raise NonFiniteLossError(
                f"step {self.steps + 1}: loss is not finite ({', '.join(f'{x:g}' for x in losses)}); "
                f"the weights were restored; lower lr or eps, or check the data")

    def finish(self, key: StepKey, losses: list[float], grads: list[float] | None = None) -> StepRecord:
        """The record of a step whose probe losses are known; the step counts from here."""
        if key.step != self.steps:
            raise RuntimeError(f"finishing step {key.step + 1} while the optimizer is at step {self.steps + 1}")
        grads = self.estimate(losses) if grads is None else grads
        record = StepRecord(self.steps, key.seed, grads, losses, [g["lr"] for g in self.param_groups])
        self.last = record
        self.steps += 1
        return record

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._seeds))

    def skip(self, records: list[StepRecord]) -> None:
        """Advance the step seeds past recorded steps (on resume), checking that each one matches."""
        for rec in records:
            seed = self._next_seed()
            if seed != rec.seed:
                raise ConfigError(
                    f"step {rec.step + 1} of the log was taken with seed {rec.seed}, but this optimizer draws {seed}: "
                    f"the run's seed or method changed since; resume with the run's own config.yaml")
        self.steps = len(records)

    @torch.no_grad()
    def replay(self, record: StepRecord, indexed: list[tuple[int, torch.Tensor]] | None = None) -> None:
        """Redo a recorded step without any forward: the same walk and update, bit for bit.

        With `indexed` (i, tensor) pairs, only those tensors are moved (a streamed block catching up).
        """
        params = self.indexed() if indexed is None else indexed
        for _ in self.walk(params, record.key):
            pass
        self.update(params, record)
        if indexed is None:
            self.steps = record.step + 1
            self.last = record

    def offsets(self, step: int) -> dict[int, float]:
        """Direction -> total scale that a full walk of step `step`'s `moves()` leaves applied (before `update`)."""
        out: dict[int, float] = {}
        self.at_step(step)
        for k, scale, _ in self.moves():
            if k is not None:
                out[k] = out.get(k, 0.0) + scale
        return out

    def update(self, indexed: list[tuple[int, torch.Tensor]], record: StepRecord) -> None:
        """θ_i ← θ_i·(1 − lr·wd) − lr·mean_k g_k z_k,i; with one direction, the restore is fused in.

        `indexed` holds (i, tensor) pairs, the tensor at the state the step's walk left it in.
        """
        n = self.at_step(record.step)
        restore = (-self.eps if self.one_sided else self.eps) if n == 1 else 0.0
        groups, group_lr = self._group_of(), self._group_lrs(record)
        for i, p in indexed:
            group = groups[i]
            lr = group_lr[id(group)]
            wd = group["weight_decay"] if p.dim() >= 2 else 0.0
            self.update_tensor(i, p, record, lr, wd, restore)

    def _group_lrs(self, record: StepRecord) -> dict[int, float]:
        """id(parameter group) -> the lr `record` holds for it (a live step's own when it holds none)."""
        lrs = record.lrs or [g["lr"] for g in self.param_groups]
        if len(lrs) != len(self.param_groups):
            raise ConfigError(f"step {record.step + 1} records {len(lrs)} learning rate(s) for "
                              f"{len(self.param_groups)} parameter groups (a steps.log of format 1 keeps the first "
                              f"group's only); replay it with the optimizer's groups as they were, or one group")
        return {id(g): lr for g, lr in zip(self.param_groups, lrs)}

    def update_tensor(self, i: int, p: torch.Tensor, record: StepRecord, lr: float, wd: float, restore: float) -> None:
        """One tensor's update (the rule a variant changes): here θ ← θ·(1 − lr·wd) − lr·ĝ.

        `restore`: the scale of direction 0 still to take back (the last probe move, fused here), or 0."""
        n, key = self.n_directions, record.key
        decay = 1 - lr * wd if wd else 1.0
        if restore:  # one draw of z serves the restore and the update: (θ + εz)·decay − lr·g·z
            self.add_z(p, key, 0, i, restore, decay, -lr * record.grads[0])
        else:
            if wd:
                p.mul_(decay)
            for k in range(n):
                self.add_z(p, key, k, i, -lr * record.grads[k] / n)

    def restore_and_estimate(self, i: int, p: torch.Tensor, record: StepRecord, restore: float) -> torch.Tensor:
        """Take back the probe moves of tensor i and return ĝ_i = mean_k g_k z_k,i (one tensor of scratch):
        the start of a rule that needs ĝ itself (momentum, Adam, sign)."""
        if restore:
            self.add_z(p, record.key, 0, i, restore)
        ghat = torch.zeros_like(p)
        for k, g in enumerate(record.grads):
            self.add_z(ghat, record.key, k, i, g / self.n_directions)
        return ghat

    def state_dict(self):
        state = super().state_dict()
        state["zo"] = {"steps": self.steps, "seeds": self._seeds.get_state(), "seed": self.seed,
                       "tensor_state": {i: dict(s) for i, s in self.tensor_state.items()}}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.steps, self.seed = zo["steps"], zo["seed"]
            self._seeds.set_state(zo["seeds"])
            devices = {i: p.device for i, p in self.indexed()}
            self.tensor_state = {int(i): {k: v.to(devices[int(i)]) if torch.is_tensor(v) else v for k, v in s.items()}
                                 for i, s in zo.get("tensor_state", {}).items()}


register_method("zosgd", MethodConfig, ZOSGD)
