"""The `sensitivity` part of the GPU check: `zotune sensitivity`'s mask measured on the device.

The squared gradients are summed on the device, resident and streamed from host memory (each block
held on the device for its backward), with the kept inputs and the running top in host memory. The
streamed mask must be the resident one exactly (the same kernels on the same values); against the
CPU's, float summation order may move an entry at the threshold, so the share of shared entries is
reported and must be at least `AGREE`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from zotune.tasks.base import Movable

AGREE = 0.99  # of the CPU mask's entries that the device's mask shares


@dataclass
class _Batch(Movable):
    input_ids: torch.Tensor


class _NextToken:
    """The language-modelling loss of token batches: the task interface `squared_gradients` reads."""

    def head(self, model, batch):
        return contextlib.nullcontext()

    def forward(self, model, batch):
        return model(input_ids=batch.input_ids, use_cache=False)

    def loss(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False).loss


def _entries(picked: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
    return {(name, i) for name, index in picked.items() for i in index.tolist()}


def check_sensitivity(device, quick: bool, repeats: int = 0) -> dict:
    """The mask on the CPU, on the device (resident) and streamed to the device: the device's agrees with
    the CPU's, and the streamed one is the resident one."""
    from zotune.bench.gpu import _llama_config, _model
    from zotune.sensitivity import squared_gradients
    from zotune.stream import StreamConfig, stream_

    config = _llama_config(64 if quick else 512, 4, 128 if quick else 1408, 4 if quick else 8,
                           1000 if quick else 8000)
    seeds = torch.Generator().manual_seed(0)
    batches = [_Batch(torch.randint(0, config.vocab_size, (2, 32), generator=seeds)) for _ in range(3)]
    masks = {}
    for where in ("cpu", "resident", "streamed"):
        model, engine = _model(config, "cpu"), None
        if where == "resident":
            model.to(device)
        elif where == "streamed":
            engine = stream_(model, StreamConfig(tier="cpu"), device, log=lambda *a, **k: None)
        try:
            picked, total = squared_gradients(model, _NextToken(), batches, 0.01, log=lambda *a: None,
                                              hold=engine.holding if engine is not None else None)
        finally:
            if engine is not None:
                engine.close()
        masks[where] = _entries(picked)
    cpu, resident = masks["cpu"], masks["resident"]
    overlap = len(cpu & resident) / len(cpu)
    return {"entries": len(cpu), "of": total, "device_shares": round(overlap, 4), "device_agrees": overlap >= AGREE,
            "streamed_equals_resident": masks["streamed"] == resident}
