"""Quantized bases: the frozen linear layers of the blocks held in int8, a float scale per output row.

`quantize_(model, keep)` replaces every `nn.Linear` inside the transformer blocks whose weight is
not in `keep` (the tensors that train stay in full precision) by an `Int8Linear`: the weight
rounded to int8 per output row (symmetric, absmax / 127), a float32 scale per row, the bias as it
was. The layer computes `x @ (q * scale)ᵀ + b`, the weight dequantized for the one matmul, so
memory at rest is a quarter of float32. The scales are parameters: `model.trainable=scales` tunes
them with ZO and nothing else (the QZO idea: ZO on the quantization scales of a quantized model),
1 value per output row. `dequantize_` turns the layers back into `nn.Linear` (for export).
"""

from __future__ import annotations

import torch
from torch import nn

from zotune.config import ConfigError

QUANTIZE = ("none", "int8")


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and a trainable float scale per output row."""

    is_quantized_linear = True  # how model code tells it from a norm (its own parameters are 1-D too)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.scale = nn.Parameter(scale.to(linear.weight.dtype), requires_grad=False)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def weight_value(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_value().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, scale per row"


def quantize_(model: nn.Module, kind: str, keep: set[int], blocks_path: str | None = None, log=print) -> int:
    """Quantize the block linears whose weight is not in `keep` (ids); returns the bytes saved."""
    from zotune.models import find_blocks

    if kind == "none":
        return 0
    if kind not in QUANTIZE:
        raise ConfigError(f"model.quantize={kind!r}: use one of {', '.join(QUANTIZE)}")
    before = after = count = 0
    for _, block in find_blocks(model, blocks_path):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and id(child.weight) not in keep:
                    quantized = Int8Linear(child)
                    setattr(parent, name, quantized)
                    before += child.weight.numel() * child.weight.element_size()
                    after += quantized.qweight.numel() + quantized.scale.numel() * quantized.scale.element_size()
                    count += 1
    if not count:
        raise ConfigError("model.quantize=int8 found no frozen nn.Linear in the blocks; this model's layers are of "
                          "another type (e.g. GPT-2's Conv1D), or all of them train")
    log(f"quantized {count} block linears to int8: {before / 2**20:,.0f} MiB -> {after / 2**20:,.0f} MiB")
    return before - after


def dequantize_(model: nn.Module) -> None:
    """Every Int8Linear back to an nn.Linear holding q * scale (a standard model, e.g. to export)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.scale.device, dtype=child.scale.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight_value())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                linear.requires_grad_(False)
                setattr(parent, name, linear)
