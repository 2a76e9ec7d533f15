"""Sensitive sparse ZO: a trained sparse delta on a frozen (float, int8 or int4) base.

A sensitivity mask (`zotune sensitivity`, `zotune.sensitivity`) names, for each block linear, the
flat indices (row · inputs + column) of its most sensitive weights: the largest squared gradients
of the task loss, a diagonal Fisher estimate measured once. `model.trainable=sensitive:MASK` then
wraps each masked linear in a `SparseDelta`: the linear itself stays frozen (and, with
`model.quantize`, is quantized like every other frozen linear, since it is now the wrapper's
`base`), and a float vector `delta` of one value per masked entry trains:

    y = x · (W_base + scatter(delta))ᵀ + bias

the sum built one matrix at a time in each forward (a quantized base dequantizes its weight for
each forward anyway; a float one is copied), so the forward is one matmul, as the base's own.
Memory at rest is the base plus the masked values and their indices (8 bytes an index, 4 a value
in float32): at a density of 0.1%, 12 bytes for every thousand weights. The index is a frozen
parameter and `delta` a parameter of the wrapper, so a streamed block carries both with it, like
any weight. `merge_deltas_` folds each delta into a float linear (export).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from zotune.config import ConfigError

MASK_FORMAT = "zotune-sensitivity-mask"


class SparseDelta(nn.Module):
    """A frozen linear (`base`: nn.Linear or a quantized one) plus a trained delta on the entries `index`."""

    is_linear_delta = True  # (merged into a float linear on export, as a tensor-train adapter is)

    def __init__(self, base: nn.Module, index: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(base.parameters()).device
        # a copy: the index given may be a view of a larger tensor, whose whole storage it would keep
        self.index = nn.Parameter(index.to(device=device, dtype=torch.int64, copy=True), requires_grad=False)
        self.delta = nn.Parameter(torch.zeros(len(index), dtype=dtype, device=device), requires_grad=False)

    def weight_value(self) -> torch.Tensor:
        """The base's weight (dequantized: a quantized base builds it anyway) plus the delta on its entries,
        one matrix at a time: one matmul a forward, and no (batch x tokens x entries) temporaries."""
        base = self.base
        weight = base.weight_value() if getattr(base, "is_quantized_linear", False) else base.weight.detach().clone()
        return weight.view(-1).index_add_(0, self.index, self.delta.to(weight.dtype)).view(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_value().to(x.dtype), self.base.bias)

    def merged(self) -> nn.Linear:
        """A float nn.Linear holding the base's weight plus the delta on its entries (the forward's weight)."""
        with torch.no_grad():
            return linear_holding(self.weight_value().to(self.delta.dtype), self.base.bias)

    def extra_repr(self) -> str:
        share = len(self.index) / (self.in_features * self.out_features)
        return f"{len(self.index)} trained entries ({share:.3%})"


def linear_holding(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen nn.Linear holding copies of `weight` (out x in) and `bias`, on their device and dtype."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def save_mask(path, indices: dict[str, torch.Tensor], how: dict) -> None:
    """Write a mask: weight name -> sorted flat indices, and how it was made (safetensors metadata)."""
    from safetensors.torch import save_file

    tensors = {name: idx.to(torch.int64).sort().values.contiguous() for name, idx in indices.items() if len(idx)}
    save_file(tensors, str(path), metadata={"format": MASK_FORMAT, "how": json.dumps(how)})


def load_mask(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weight name -> flat indices, how it was made) from a mask file; a clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MASK_FORMAT:
                raise ConfigError(f"{path} is not a sensitivity mask (no '{MASK_FORMAT}' in its metadata); make one "
                                  f"with `zotune sensitivity --out {path}`")
            return {name: f.get_tensor(name) for name in f.keys()}, json.loads(meta.get("how", "{}"))
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"cannot read the sensitivity mask {path} ({str(e).splitlines()[0][:120]}); make one with "
                          f"`zotune sensitivity --out FILE` and pass that file to model.trainable=sensitive:FILE") \
            from None


def attach_deltas(model: nn.Module, path, dtype: torch.dtype | None = None) -> int:
    """Wrap every linear the mask at `path` names in a SparseDelta; returns the entries that train."""
    return wrap_entries(model, load_mask(path)[0], dtype, path)


def wrap_entries(model: nn.Module, indices: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                 path="(in memory)") -> int:
    """Wrap each linear `indices` names (weight name -> flat entries) in a SparseDelta; returns the entries."""
    modules = dict(model.named_modules())
    total = 0
    for name, index in indices.items():
        owner_path, _, leaf = name.rpartition(".")
        module = modules.get(owner_path)
        quantized = getattr(module, "is_quantized_linear", False)  # (a disk tier's quantized base)
        if leaf != "weight" or not (isinstance(module, nn.Linear) or quantized):
            raise ConfigError(f"the mask {path} names {name!r}, which is not the weight of a linear layer of this "
                              f"model; make the mask for this model (`zotune sensitivity --model ...`)")
        shape = (module.out_features, module.in_features)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= shape[0] * shape[1]):
            raise ConfigError(f"the mask {path} names entries outside {name} {shape}; it was made for another "
                              f"model: make it again for this one")
        parent, _, child = owner_path.rpartition(".")
        setattr(modules[parent] if parent else model, child,
                SparseDelta(module, index, dtype or (module.scale if quantized else module.weight).dtype))
        total += len(index)
    if not total:
        raise ConfigError(f"the mask {path} names no entry to train; make it with a larger --density")
    return total


def merge_deltas_(model: nn.Module) -> None:
    """Every trained delta on a linear (a SparseDelta, a tensor-train adapter) replaced by a float linear
    holding its base plus its delta (a standard model)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if getattr(child, "is_linear_delta", False):
                setattr(parent, name, child.merged())
