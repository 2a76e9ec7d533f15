"""FZOO (Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards
Adam-Scale Speed", ICLR 2026): N one-sided Rademacher probes around L(θ), the step normalised by the
spread of the probe losses.

    l_0 = L(θ);  l_k = L(θ + ε z_k), k = 1..N;  σ = population std of l_1..l_N
    θ ← θ·(1 − lr·wd) − lr · (1/N) Σ_k (l_k − l_0)/σ · z_k

As the authors' code (`zo_step` / `zo_update` of github.com/DKmiyan/FZOO): σ over the perturbed
losses only, `unbiased=False`, and no 1/ε in the projected gradient (the paper's formula has it; with
the step normalised by σ it is a constant factor absorbed into lr). The recorded projected gradients
are (l_k − l_0)/σ, so replay needs no loss. When every probe loss is the same (σ = 0) the step moves
nothing. Differences from the paper's code: z is zotune's counter-based Rademacher (not
`torch.randint` under the global seed), and the N probe forwards run one after another (the paper
batches them on a GPU: the same arithmetic, other kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zotune.config import ConfigError
from zotune.methods.registry import MethodConfig, register_method
from zotune.methods.zosgd import ZOSGD


@dataclass
class FZOOConfig(MethodConfig):
    """FZOO's defaults: 8 one-sided Rademacher directions (the authors' N); lr 1e-2, the better of the
    two measured on the last 2 blocks (docs/compare.md). On the final norm alone it takes lr 0.2
    (`zotune.resolve.TRAINABLE_DEFAULTS`)."""

    lr: float = 1e-2
    n_directions: int = 8
    one_sided: bool = True


class FZOO(ZOSGD):
    @staticmethod
    def check_probes(n_directions: int, one_sided: bool) -> None:
        """One-sided around L(θ), and at least two directions (their losses' spread sets the step)."""
        if not one_sided or n_directions < 2:
            raise ConfigError("fzoo takes one-sided probes around L(θ) and at least 2 directions (the spread of their "
                              "losses sets the step): keep method.one_sided=true and method.n_directions >= 2 (e.g. 8)")

    def __init__(self, params, n_directions: int = 8, one_sided: bool = True, **options):
        super().__init__(params, n_directions=n_directions, one_sided=one_sided, **options)

    def estimate(self, losses: list[float]) -> list[float]:
        base, probes = losses[0], losses[1:]
        mean = sum(probes) / len(probes)
        sigma = math.sqrt(sum((x - mean) ** 2 for x in probes) / len(probes))
        if not sigma > 0:
            return [0.0] * len(probes)
        return [(x - base) / sigma for x in probes]


register_method("fzoo", FZOOConfig, FZOO)
