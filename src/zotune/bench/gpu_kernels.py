"""The GPU check's look at the methods' own CUDA kernels: LOZO's low-rank sweep and HiZOO's sweep,
three steps on the device against the same steps on the CPU."""

from __future__ import annotations

import torch

LOSSES = [1.0, 1.3, 0.8, 1.1, 1.25, 0.9, 1.0, 1.2, 0.95]  # three steps of three forwards at most


def _three_steps(name: str, options: dict, shapes: list, where) -> list[torch.Tensor]:
    from zotune.methods import make_optimizer

    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(where) for i, s in enumerate(shapes)]
    opt = make_optimizer(name, params, seed=3, lr=1e-3, eps=1e-3, **options)
    losses = iter(LOSSES)
    for _ in range(3):
        opt.step(lambda: torch.tensor(next(losses)))
    return [p.cpu() for p in params]


def check_method_kernels(device, quick: bool) -> dict:
    """LOZO (rank 2: it claims the same bits on every device) must equal the CPU bit for bit; HiZOO claims
    that its runs depend on the device, so whether its bits match is reported, not required."""
    from zotune.methods import triton_sweep

    shapes = [(64, 96), (96,)] if quick else [(4096, 11008), (4096,)]
    out = {"kernel": "triton" if triton_sweep.available(torch.empty(1, device=device)) else "eager"}
    for name, options in (("lozo", {"rank": 2, "interval": 2}), ("hizoo", {"hessian_smoothing": 1e-3})):
        cpu, here = (_three_steps(name, options, shapes, where) for where in ("cpu", device))
        same = all(torch.equal(a, b) for a, b in zip(cpu, here))
        if name == "lozo":
            out["lozo_equal"] = same
        else:
            worst = max(float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) for a, b in zip(cpu, here))
            out["hizoo_bits"] = "the CPU's" if same else f"differ (max relative {worst:.1e})"
    return out
