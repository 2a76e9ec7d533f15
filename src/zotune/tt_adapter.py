"""AdaZeta's tensor-train adapters (`adapter.kind=tt`): each adapted linear gains ΔW held as a chain
of small 3-way cores.

The update of a matrix W (out x in) is a tensor-train matrix: out and in are each split into
`adapter.cores` factors (o_1..o_d, i_1..i_d, as near-equal as their divisors allow) and core k is
(r_{k-1}, o_k·i_k, r_k) with r_0 = r_d = 1 and the inner ranks `adapter.r`. ΔW is their chain
product, reshaped back to (out, in): far fewer values than LoRA at the same rank (d = 3, r = 8 on a
576 x 576 matrix: 5,256 against LoRA's 9,216). The last core starts at zero, so the model starts as
the base (as LoRA's B does); the others start seeded, from the run's seed. ΔW is rebuilt from the
cores at each forward (a few small matrix products) and added: y = base(x) + x·ΔWᵀ. The cores are
parameters of the wrapper, so a block streamed from host memory carries them; export folds ΔW into
each base linear (`zotune.sparse_delta.merge_deltas_`), giving a standard model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.sparse_delta import linear_holding


def factors(n: int, d: int) -> list[int]:
    """n split into d factors (product n), each the divisor of what is left nearest its even share."""
    out = []
    for k in range(d - 1):
        share = (n ** (1 / (d - k)))
        divisor = min((f for f in range(1, n + 1) if n % f == 0), key=lambda f: (abs(math.log(f / share)), f))
        out.append(divisor)
        n //= divisor
    return sorted(out + [n])


class TTDelta(nn.Module):
    """A frozen linear (`base`) plus ΔW from a chain of tensor-train cores."""

    is_linear_delta = True  # (merged into a float linear on export, as a SparseDelta is)

    def __init__(self, base: nn.Linear, rank: int, n_cores: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.outs, self.ins = factors(self.out_features, n_cores), factors(self.in_features, n_cores)
        ranks = [1] + [rank] * (n_cores - 1) + [1]
        weight = base.weight
        cores = []
        for k in range(n_cores):
            shape = (ranks[k], self.outs[k] * self.ins[k], ranks[k + 1])
            if k == n_cores - 1:
                core = torch.zeros(shape, dtype=weight.dtype)  # ΔW = 0 at the start
            else:
                core = torch.randn(shape, generator=generator).to(weight.dtype) / math.sqrt(ranks[k + 1])
            cores.append(nn.Parameter(core.to(weight.device), requires_grad=False))
        self.cores = nn.ParameterList(cores)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) from the cores."""
        chain = self.cores[0].reshape(-1, self.cores[0].shape[-1])  # (m_1, r_1)
        for core in self.cores[1:]:
            chain = (chain @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        d = len(self.cores)
        pairs = [dim for o, i in zip(self.outs, self.ins) for dim in (o, i)]
        order = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]  # (o_1, i_1, ...) -> (o_1.., i_1..)
        return chain.reshape(pairs).permute(order).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(x, self.delta_weight().to(x.dtype))

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            weight = self.base.weight
            return linear_holding(weight + self.delta_weight().to(weight.dtype), self.base.bias)

    def extra_repr(self) -> str:
        return f"cores {[tuple(c.shape) for c in self.cores]}: {sum(c.numel() for c in self.cores):,} values"


def apply_tt(model: nn.Module, rank: int, n_cores: int, targets: list[str], seed: int):
    """(the model with TT adapters on its target linears, their cores as (name, parameter) pairs);
    `targets` names modules by their last name (`q_proj`) or in full (`model.layers.3.self_attn.q_proj`)."""
    generator = torch.Generator().manual_seed(seed)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and (name in targets or name.rpartition(".")[2] in targets):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    TTDelta(module, rank, n_cores, generator))
            wrapped += 1
    if not wrapped:
        raise ConfigError(f"adapter.targets={','.join(targets)}: no nn.Linear of this model has that name; name "
                          f"modules it has (e.g. q_proj,v_proj)")
    named = [(f"{n}.cores.{k}", core) for n, m in model.named_modules() if isinstance(m, TTDelta)
             for k, core in enumerate(m.cores)]
    return model, named
