"""Host work per step on an accelerator, counted on the CPU: the operations a method dispatches (a
TorchDispatchMode) and the Triton kernels it launches for one step over a Llama-7B-shaped block, on
meta tensors (an accelerator's chunking, no memory). Each launch and op costs microseconds of host
time: a method that dispatches thousands per block spends more time launching than a GPU's forward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zotune.methods import make_optimizer, triton_sweep

# q, k, v, o; gate, up, down; two norms: a Llama-7B block
BLOCK_7B = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008), (4096,), (4096,)]

# (ops + launches) per step over one block, with the Triton kernels. Measured 2026-12-06: zosgd and lozo 38,
# hizoo 50, zosgd-momentum 92, zosgd-sign 74, zosgd-conservative 74, zoadam 146, fzoo 248 (8 probes);
# before their kernels, eager: lozo 4,287, hizoo 1,478. lozo-m 2,606: its momentum update (real-valued
# N·Vᵀ) is still eager.
BUDGET = {"zosgd": 40, "lozo": 40, "hizoo": 60, "zosgd-momentum": 100, "zosgd-sign": 80, "zosgd-conservative": 80,
          "zoadam": 150, "fzoo": 250, "lozo-m": 2700}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _host_work(method: str, monkeypatch, triton: bool) -> tuple[int, int]:
    """(ops dispatched, kernels launched) by one step of `method` over a 7B block on meta tensors."""
    launches = []
    if triton:  # what a float32 CUDA tensor gets: the kernels, counted instead of launched
        monkeypatch.setattr(triton_sweep, "available", lambda p: p.dtype == torch.float32 and p.is_contiguous())
        monkeypatch.setattr(triton_sweep, "signs_axpy", lambda *a, **k: launches.append(1) or True)
        monkeypatch.setattr(triton_sweep, "low_rank_axpy", lambda *a, **k: launches.append(1) or True)
        monkeypatch.setattr(triton_sweep, "hessian_axpy", lambda *a, **k: launches.append(1) or True)
    params = [torch.zeros(shape, device="meta") for shape in BLOCK_7B]
    opt = make_optimizer(method, params, seed=1, lr=1e-3, eps=1e-3)
    count = _Count()
    with count:
        opt.step(lambda: torch.tensor(1.0))
    return count.ops, len(launches)


@pytest.mark.parametrize("method", sorted(BUDGET))
def test_a_step_over_a_7b_block_stays_within_its_host_budget(method, monkeypatch):
    ops, launches = _host_work(method, monkeypatch, triton=True)
    assert ops + launches <= BUDGET[method], f"{method}: {ops} ops + {launches} launches"


@pytest.mark.parametrize("method, sweeps", [("lozo", 3), ("hizoo", 3)])
def test_lozo_and_hizoo_make_one_launch_a_tensor_where_their_eager_paths_dispatch_thousands(method, sweeps,
                                                                                           monkeypatch):
    """One launch per tensor and sweep (lozo: +εZ, −2εZ, the restore fused with the update; hizoo: +εz/√H,
    −2εz/√H, the update of θ and H), where LOZO's eager path draws the factors and runs a matrix product
    and its adds per row chunk, and HiZOO's draws z and takes 1/√H chunk by chunk."""
    eager_ops, _ = _host_work(method, monkeypatch, triton=False)
    ops, launches = _host_work(method, monkeypatch, triton=True)
    assert launches == sweeps * len(BLOCK_7B) and eager_ops > 25 * (ops + launches)
