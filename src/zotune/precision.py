"""The precision policy of a run, resolved once, and the float32 masters of 16-bit trained tensors.

ZO updates are about 1e-7 of a weight (lr 1e-6 times a projected gradient of about 0.1), far below
the resolution of a 16-bit format (bfloat16: 8e-3 relative, float16: 1e-3): applied to a 16-bit
tensor they round away, and every in-place perturb / restore rounds it again. So a tensor that
trains is always float32: the streaming engine keeps float32 masters of the blocks' trained tensors
on its tier (`zotune.stream`), and a resident run whose model is 16-bit keeps `Masters` beside the
model: the optimizer perturbs and updates the float32 copies, and the model's own 16-bit tensors (the
ones its forward reads) are refreshed from them before every forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    """The precision policy, resolved once: how weights are stored, computed and updated, and why."""

    storage: torch.dtype
    compute: torch.dtype
    reason: str

    @classmethod
    def resolve(cls, storage: torch.dtype, compute: torch.dtype, streamed: bool = True) -> Precision:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        what = "blocks" if streamed else "weights"
        text = f"{what} stored in {name(storage)}, computed in {name(compute)}"
        if storage == compute == torch.float32:
            return cls(storage, compute, text + "; updates applied in float32")
        where = "on the tier and moved in float32" if streamed else \
            "beside the model, copied into its tensors before every forward"
        return cls(storage, compute, text + f"; trained tensors kept as float32 masters {where} (a 16-bit value "
                   "would round away updates of about 1e-7 relative)")


class Masters:
    """float32 masters of a resident model's 16-bit trained tensors.

    `values` is what the optimizer trains: the master of each 16-bit tensor, and the tensor itself for
    a float32 one. `sync()` rounds each master into the model's tensor (its compute copy): `probe`
    wraps a step's closure so that every forward sees the point the optimizer moved to.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.compute = list(params)
        with torch.no_grad():
            self.values = [p.detach().float() if p.dtype in SIXTEEN_BIT else p for p in self.compute]
        self.low = [(c, m) for c, m in zip(self.compute, self.values) if m is not c]

    @staticmethod
    def needed(params: Sequence[torch.Tensor]) -> bool:
        return any(p.dtype in SIXTEEN_BIT for p in params)

    @property
    def extra_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for _, m in self.low)

    @torch.no_grad()
    def sync(self) -> None:
        for compute, master in self.low:
            compute.copy_(master)

    def probe(self, closure: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def synced() -> torch.Tensor:
            self.sync()
            return closure()

        return synced


def set_tf32(device: torch.device, enabled: bool) -> str | None:
    """On CUDA, whether float32 matrix products (and convolutions) run on TF32 tensor cores: inputs rounded
    to a 10-bit mantissa, products accumulated in float32, several times the float32 rate on Ampere
    and later GPUs. Returns a line for the log (None off CUDA, where nothing changes).

    A ZO step compares two losses whose difference is 2·eps·g (about 1e-3 of the loss for eps 1e-3),
    and TF32's rounding moves both forwards alike; `zotune bench gpu` measures how far it moves the
    projected gradients. `model.tf32=false` keeps full float32 products."""
    if torch.device(device).type != "cuda":
        return None
    # Through the one API that torch keeps: setting the legacy allow_tf32 flags as well breaks when both are
    # used in a process (torch 2.9+ refuses to read a precision set through the other API).
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    if enabled:
        return "float32 matrix products on TF32 tensor cores (model.tf32=false: full float32)"
    return "float32 matrix products on full float32 (model.tf32=false)"
