"""Quantized bases: the frozen linear layers of the blocks held in 8 or 4 bits, with float scales.

`quantize_(model, kind, keep)` replaces every `nn.Linear` inside the transformer blocks whose weight
is not in `keep` (the tensors that train stay in full precision) by a quantized layer that
dequantizes its weight for the one matmul of each forward:
- `int8` (`Int8Linear`): symmetric, a float scale per output row (absmax / 127): a quarter of
  float32 at rest.
- `int4` (`Int4Linear`): asymmetric in groups of 32 consecutive inputs, w = scale·q + minimum with
  q in 0..15, two values a byte: 0.75 bytes a weight with the float32 scale and minimum (0.19 of
  float32). The grid is that of GGUF's Q4_1, so a model shipped as Q4_1 (the default SmolLM2 is)
  goes back to the values it shipped with, up to float rounding of the group's scale.
The scales are parameters: `model.trainable=scales` tunes them with ZO and nothing else (the QZO
idea: ZO on the quantization scales of a quantized model). `dequantize_` turns the layers back
into `nn.Linear` (for export).
"""

from __future__ import annotations

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.models import QUANTIZE, find_blocks
from zotune.sparse_delta import linear_holding

GROUP = 32  # int4: inputs per scale, GGUF's Q4_0 / Q4_1 block


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A frozen parameter (not a buffer): the quantized values go wherever the block's parameters go,
    so a streamed block carries them (to the device, to a stream folder) like any weight."""
    return nn.Parameter(t, requires_grad=False)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is `weight_value()`, rebuilt from its quantized form at each forward."""

    is_quantized_linear = True  # how model code tells it from a norm (its own parameters are small too)
    describe = ""  # for extra_repr

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def weight_value(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_value().to(x.dtype), self.bias)

    def stored_bytes(self) -> int:
        """Bytes of the weight at rest (bias excluded): the quantized values and their float parameters."""
        return sum(t.nbytes for name, t in self.named_parameters() if name != "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe}"


class Int8Linear(QuantizedLinear):
    """An int8 weight with a trainable float scale per output row."""

    describe = "int8 weight, scale per row"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.qweight = _frozen(torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.scale = nn.Parameter(scale.to(linear.weight.dtype), requires_grad=False)

    def weight_value(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype).mul_(self.scale[:, None])


class Int4Linear(QuantizedLinear):
    """A 4-bit weight, two values a byte, with a trainable float scale and a frozen minimum per group of
    32 inputs (w = scale·q + minimum, q in 0..15); `scale` is flat (row-major: row, then group)."""

    describe = f"int4 weight, scale and minimum per {GROUP} inputs"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        rows, cols = linear.weight.shape
        groups = linear.weight.detach().float().view(rows, cols // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(rows, cols)
        self.qweight = _frozen(q[:, 0::2] | (q[:, 1::2] << 4))  # even inputs low, odd inputs high
        self.minimum = _frozen(low.to(linear.weight.dtype))
        # Flat, like every other scale: 1-D tensors never take weight decay.
        self.scale = nn.Parameter(scale.to(linear.weight.dtype).view(-1), requires_grad=False)

    def weight_value(self) -> torch.Tensor:
        # One float buffer, filled and scaled in place: about 5x faster than stacking the nibbles first.
        value = torch.empty(self.out_features, self.in_features // 2, 2, dtype=self.scale.dtype,
                            device=self.scale.device)
        value[..., 0] = self.qweight & 15
        value[..., 1] = self.qweight >> 4
        grouped = value.view(self.out_features, -1, GROUP)
        grouped.mul_(self.scale.view(self.minimum.shape)[..., None]).add_(self.minimum[..., None])  # not fused: as GGUF
        return value.view(self.out_features, self.in_features)


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}
QWEIGHT_KIND = {torch.int8: "int8", torch.uint8: "int4"}  # which layer a stored `qweight` belongs to


def quantized_note(module: nn.Module) -> str:
    """" (their linears quantized to int4)" for a module holding quantized linears, else "" (for logs)."""
    kinds = sorted(kind for kind, layer in LAYERS.items() if any(isinstance(m, layer) for m in module.modules()))
    return f" (their linears quantized to {', '.join(kinds)})" if kinds else ""


def quantize_like_(block: nn.Module, tensors: dict[str, torch.dtype]) -> None:
    """Make `block` (a skeleton's, on the meta device) quantized where the stored tensors of a block
    (name -> dtype, e.g. a stream folder's) say so: a `<module>.qweight` names a quantized linear."""
    for name, dtype in tensors.items():
        if name.endswith(".qweight"):
            path = name[: -len(".qweight")]
            parent, _, child = path.rpartition(".")
            owner = block.get_submodule(parent) if parent else block
            setattr(owner, child, LAYERS[QWEIGHT_KIND[dtype]](getattr(owner, child)))


def standard_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """`block`'s parameters by name as a standard float model holds them, to write a checkpoint a block at a
    time: a quantized linear's weight value in place of its quantized form, and a trained delta on a linear
    (a sensitive mask's SparseDelta, a tensor-train adapter) folded into that linear."""
    out, whole = {}, []  # whole: prefixes of modules written as one linear (their children are inside)
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(w) for w in whole):
            continue
        if getattr(module, "is_linear_delta", False):
            merged = module.merged()
            out[f"{prefix}weight"] = merged.weight.detach()
            if merged.bias is not None:
                out[f"{prefix}bias"] = merged.bias.detach()
            whole.append(prefix)
        elif isinstance(module, QuantizedLinear):
            out[f"{prefix}weight"] = module.weight_value().to(module.scale.dtype)
            if module.bias is not None:
                out[f"{prefix}bias"] = module.bias.detach()
        else:  # (a quantized linear has no children)
            out.update({f"{prefix}{n}": p.detach() for n, p in module.named_parameters(recurse=False)})
    return out


def quantize_(model: nn.Module, kind: str, keep: set[int], blocks_path: str | None = None, log=print) -> int:
    """Quantize the block linears whose weight is not in `keep` (ids); returns the bytes saved."""
    if kind == "none":
        return 0
    if kind not in QUANTIZE:
        raise ConfigError(f"model.quantize={kind!r}: use one of {', '.join(QUANTIZE)}")
    layer = LAYERS[kind]
    before = after = count = uneven = 0
    for _, block in find_blocks(model, blocks_path):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear or id(child.weight) in keep:
                    continue
                if layer is Int4Linear and child.in_features % GROUP:
                    uneven += 1  # its rows do not split into whole groups: it stays float
                    continue
                quantized = layer(child)
                setattr(parent, name, quantized)
                before += child.weight.nbytes
                after += quantized.stored_bytes()
                count += 1
    if not count:
        why = f"none has a multiple of {GROUP} inputs" if uneven else \
            "this model's layers are of another type (e.g. GPT-2's Conv1D), or all of them train"
        raise ConfigError(f"model.quantize={kind} found no frozen nn.Linear in the blocks to quantize: {why}")
    _own_copies(model)
    _release_freed_memory()
    log(f"quantized {count} block linears to {kind}: {before / 2**20:,.0f} MiB -> {after / 2**20:,.0f} MiB"
        + (f" ({uneven} kept in float: their inputs are not a multiple of {GROUP})" if uneven else ""))
    return before - after


def _own_copies(model: nn.Module) -> None:
    """Give the float tensors left (embeddings, norms, a float tail) storage of their own. A checkpoint is
    loaded as views of one memory map of its file: while any view lives, every page of the file that
    was read (all of them, to quantize) stays in the process's memory, and the quantized base would
    take as much as the float one (measured: 1,116 MiB peak RSS for an int4 SmolLM2-135M run, 784 with
    this)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.clone()


def _release_freed_memory() -> None:
    """Give the pages of the float weights just replaced back to the system (else the allocator keeps them)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the pages are reused by later allocations instead
        pass


def dequantize_(model: nn.Module) -> None:
    """Every quantized linear back to an nn.Linear holding its weight value (a standard model, e.g. to export)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                setattr(parent, name, linear_holding(child.weight_value(), child.bias))
