"""CGE: DeepZero's coordinate-wise gradient estimate (Chen et al., "DeepZero: Scaling up Zeroth-Order
Optimization for Deep Model Training", ICLR 2024), one finite difference per coordinate.

Direction k of a step is the unit vector of one trained value c_k: g_k = (L(θ + μ·e_c) − L(θ)) / μ
(one-sided, DeepZero's form: one forward per coordinate plus the reference L(θ)), or
(L(θ + μ·e_c) − L(θ − μ·e_c)) / 2μ with `one_sided=false`. Each g_k estimates ∂L/∂θ_c alone, with no
noise from other coordinates (exact as μ → 0), so the update is a coordinate step of the estimate,
θ_c ← θ_c − lr·g_k, not an average over directions: lr means what it means for SGD.

`n_directions` coordinates are estimated each step: the first `n_directions` of a seeded permutation
of every trained value (all of them when `n_directions` equals their number, DeepZero's CGE). A step
costs n + 1 forwards, so this is for a small trained set: a probe, a norm, a sparse mask (with the
frozen prefix reused, each forward runs only what follows the last frozen block). The moves are
scalar adds on single values: the same bits on every device, and the step log's g_k, one float per
coordinate, replay the run exactly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from zotune.config import ConfigError
from zotune.methods.registry import MethodConfig, register_method
from zotune.methods.zosgd import ZOSGD, StepKey, StepRecord


@dataclass
class CGEConfig(MethodConfig):
    """One-sided by default (DeepZero's); μ = `eps` = 5e-3 (DeepZero's); 16 coordinates a step."""

    lr: float = 1e-2
    eps: float = 5e-3
    n_directions: int = 16
    one_sided: bool = True


class CGE(ZOSGD):
    def __init__(self, params, **options):
        super().__init__(params, **options)
        self._starts, start = [], 0
        for p in self._params():  # tensor i holds the coordinates starts[i] .. starts[i] + numel − 1
            self._starts.append(start)
            start += p.numel()
        self.values = start
        most = max(self.n_directions, self.cfg.n_directions_max)  # (the query schedule's largest step)
        if most > self.values:
            raise ConfigError(f"method.n_directions={most} is more than the {self.values} trained values: "
                              f"cge estimates one value a direction; use n_directions <= {self.values}")
        self._picked: dict[StepKey, torch.Tensor] = {}
        self._lock = threading.Lock()  # the streaming engine's threads share the cache

    def coordinates(self, key: StepKey) -> torch.Tensor:
        """The trained values step `key` estimates, by global index: the first n of a permutation seeded
        by the step's seed (on the CPU: the same on every device), or all of them in order."""
        with self._lock:
            picked = self._picked.get(key)
            if picked is None:
                picked = self._draw(key.seed)
                for old in list(self._picked)[:-1]:  # this step's and the previous (a streamed update)
                    del self._picked[old]
                self._picked[key] = picked
        return picked

    def _draw(self, seed: int) -> torch.Tensor:
        n, total = self.n_directions, self.values
        if n == total:
            return torch.arange(total)
        gen = torch.Generator().manual_seed(seed)
        if total <= 1 << 20:
            return torch.randperm(total, generator=gen)[:n]
        picked: list[int] = []  # a large trained set: n distinct draws, in the order drawn (no permutation of it)
        while len(picked) < n:
            for c in torch.randint(0, total, (2 * n,), generator=gen).tolist():
                if c not in picked and len(picked) < n:
                    picked.append(c)
        return torch.tensor(picked)

    def add_z(self, p: torch.Tensor, key: StepKey, k: int, i: int, scale: float, decay: float = 1.0,
              then: float = 0.0) -> None:
        """p ← (p + scale·e_c)·decay + then·e_c, e_c the unit vector of coordinate c_k when it is in
        tensor i (else only the decay)."""
        local = int(self.coordinates(key)[k]) - self._starts[i]
        inside = 0 <= local < p.numel()
        if inside and scale:
            p.view(-1)[local: local + 1].add_(scale)
        if decay != 1:
            p.mul_(decay)
        if inside and then:
            p.view(-1)[local: local + 1].add_(then)

    def update_tensor(self, i: int, p: torch.Tensor, record: StepRecord, lr: float, wd: float, restore: float) -> None:
        """θ ← θ·(1 − lr·wd) − lr·Σ_k g_k·e_{c_k}: each estimated value takes its own step."""
        if restore:  # (one coordinate: its restore, fused as ZO-SGD's)
            self.add_z(p, record.key, 0, i, restore)
        if wd:
            p.mul_(1 - lr * wd)
        for k, g in enumerate(record.grads):
            self.add_z(p, record.key, k, i, -lr * g)


register_method("cge", CGEConfig, CGE)
