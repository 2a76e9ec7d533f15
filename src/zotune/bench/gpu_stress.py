"""The `stress` part of the GPU check: streamed == resident while the timing is made hostile.

What the CPU's fake accelerator cannot model: a compute stream that runs asynchronously to the host,
and the caching allocator handing memory freed on one stream to another. Here, on CUDA, every copy on
the side stream starts after a spin (`torch.cuda._sleep`) so that it lands late, every block's compute
starts after a spin on the compute stream, and before each copy the side stream fills fresh memory
with NaN and frees it (the allocator then reuses it for the copy's destination). A missing wait, a
missing `record_stream` or a read of a buffer before its copy landed shows up as different bits.
"""

from __future__ import annotations

import torch

from zotune.stream.transfers import Accelerator

SPIN = 200_000  # GPU cycles (~0.1 ms): longer than a small copy, short enough for many blocks


class StressAccelerator(Accelerator):
    """CUDA's calls, with late side-stream copies and scribbled memory before each of them."""

    def copy(self, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        self._hostile(t.numel(), dtype)
        return super().copy(t, device, dtype)

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._hostile(src.numel(), src.dtype)
        super().copy_into(dst, src)

    def _hostile(self, n: int, dtype: torch.dtype) -> None:
        torch.empty(n, dtype=dtype, device=self.device).fill_(float("nan") if dtype.is_floating_point else -1)
        torch.cuda._sleep(SPIN)


def check_stress(device, quick: bool, repeats: int = 0) -> dict:
    """Streamed (host-memory tier, zosgd and zoadam) under the hostile timing == resident, bit for bit."""
    if device.type != "cuda":
        return {"skipped": "CUDA only: the CPU's fake accelerator covers delayed copies (tests/test_gpu_logic.py)"}
    from zotune.bench.gpu import _llama_config, _model
    from zotune.methods import make_optimizer
    from zotune.models import find_block_list
    from zotune.stream import StreamConfig, stream_

    config = _llama_config(64 if quick else 1024, 4, 128 if quick else 2816, 4 if quick else 16,
                           1000 if quick else 8000)
    batch = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for name in ("zosgd", "zoadam"):
        runs = []
        for stressed in (False, True):
            model = _model(config, "cpu")
            params = list(model.parameters())
            opt = make_optimizer(name, params, seed=1, lr=1e-3, eps=1e-3)
            if stressed:
                engine = stream_(model, StreamConfig(tier="cpu"), device, accelerator=StressAccelerator(device),
                                 log=lambda *a, **k: None)
                for block in find_block_list(model)[1]:  # compute that starts late on the compute stream
                    block.register_forward_pre_hook(lambda *a: torch.cuda._sleep(SPIN))
            else:
                model.to(device)
                engine = None
            losses = []
            for _ in range(3):
                closure = lambda: model(input_ids=batch, labels=batch, use_cache=False).loss  # noqa: E731
                losses.append(float(engine.step(opt, closure) if engine else opt.step(closure)))
            values = [v.detach().cpu().clone() for v in (engine.trained_values() if engine else params)]
            if engine:
                engine.close()
            runs.append((losses, values))
        (a, va), (b, vb) = runs
        out[name] = a == b and all(torch.equal(x, y) for x, y in zip(va, vb))
    return out
