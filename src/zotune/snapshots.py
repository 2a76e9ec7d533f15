"""Snapshots of a run's trained tensors: written whole with a content digest, read back newest first."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from zotune.files import tensor_digest


def save(folder: Path, step: int, params: list[torch.Tensor], keep: int = 2, protected: int = -1) -> None:
    """The trained tensors of `step` as `folder`/step-NNNNNNN.safetensors with a digest of their content, put
    in place whole; the `keep` newest stay, and the snapshot of step `protected` (the best one)."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    tensors = {f"t{i}": p.detach().contiguous().cpu() for i, p in enumerate(params)}
    name = f"step-{step:07d}.safetensors"
    save_file(tensors, folder / f".{name}.tmp",
              metadata={"step": str(step), "digest": tensor_digest(tensors.values())})
    os.replace(folder / f".{name}.tmp", folder / name)
    for old in sorted(folder.glob("step-*.safetensors"))[:-keep]:
        if old.name != f"step-{protected:07d}.safetensors":
            old.unlink()


def load_latest(folder: Path, max_step: int, params: list[torch.Tensor]) -> tuple[int, str | None]:
    """Load the newest intact snapshot in `folder` at or before `max_step` into `params`; (its step, a note
    naming a damaged one passed over)."""
    from safetensors import safe_open

    note = None
    for path in sorted(folder.glob("step-*.safetensors"), reverse=True):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                step = int(meta["step"])
                if step > max_step:
                    continue
                tensors = [f.get_tensor(f"t{i}") for i in range(len(params))]
            if tensor_digest(tensors) != meta["digest"] or any(t.shape != p.shape for t, p in zip(tensors, params)):
                raise ValueError("digest or shapes differ")
        except Exception as e:  # noqa: BLE001 -- any damage means: fall back to an older snapshot
            note = f"snapshot {path.name} is damaged ({type(e).__name__}); using an older one or the base"
            continue
        with torch.no_grad():
            for p, t in zip(params, tensors):
                p.copy_(t)
        return step, note
    return 0, note
