"""The streaming verb: `stream_(model, StreamConfig(...), device)` puts a model's blocks on a tier and
returns the engine that streams them; `unstream_` brings them back. (`load_streamed` in `folder`
opens an existing stream folder.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.models import DTYPES, find_block_list
from zotune.precision import Precision
from zotune.quant import quantized_note
from zotune.stream.disk import DiskTier
from zotune.stream.engine import StreamEngine
from zotune.stream.folder import write_folder
from zotune.stream.ram import RamTier
from zotune.stream.transfers import Accelerator, hollow, host_views

TIERS = ("none", "cpu", "disk")


@dataclass
class StreamConfig:
    """Where the blocks live and how they travel.

    tier: `none` (resident), `cpu` (host memory) or `disk` (a stream folder, `dir`); storage_dtype: how frozen block
    tensors are stored (default: the model's dtype; trained ones are always kept as float32
    masters); prefetch: how many blocks are fetched ahead of the one computing; device_blocks: the most
    blocks on the compute device at once (0: prefetch + 2, the one computing, those fetched ahead and the
    one being written back, so both directions of the link move at once; prefetch + 1: a fetch first
    waits for the write-back before it, the least memory).
    """

    tier: str = "none"
    dir: str | None = None
    storage_dtype: str | None = None
    prefetch: int = 1
    device_blocks: int = 0

    def __post_init__(self):
        if self.tier not in TIERS:
            raise ConfigError(f"stream.tier={self.tier!r} is not known; use one of {', '.join(TIERS)}")
        if self.tier == "disk" and not self.dir:
            raise ConfigError("stream.tier=disk needs stream.dir=<folder for the block files> (--offload-dir)")
        if self.storage_dtype is not None and self.storage_dtype not in DTYPES:
            raise ConfigError(f"stream.storage_dtype={self.storage_dtype!r}; use one of {', '.join(DTYPES)}")
        if not (isinstance(self.prefetch, int) and self.prefetch >= 1):
            raise ConfigError(f"stream.prefetch={self.prefetch} must be an integer >= 1")
        if not (isinstance(self.device_blocks, int) and (self.device_blocks == 0 or
                                                        self.device_blocks >= self.prefetch + 1)):
            raise ConfigError(f"stream.device_blocks={self.device_blocks} must be 0 (prefetch + 2) or an integer >= "
                              f"stream.prefetch + 1 = {self.prefetch + 1} (the block computing and those fetched "
                              f"ahead)")


def stream_(model: nn.Module, cfg: StreamConfig, device: torch.device | str = "cpu", blocks_path: str | None = None,
            at_step: int = 0, log=print, accelerator: Accelerator | None = None) -> StreamEngine:
    """Move `model`'s transformer blocks to the tier of `cfg`, in place; returns the engine.

    Everything outside the blocks goes to `device`; the blocks never do (load the model on the CPU:
    only stand-ins of one element are made on the device). With the disk tier, `cfg.dir` is written
    from the model's current weights, one block at a time (an existing stream folder is refused: load
    it with `load_streamed` instead). `at_step`: how many steps the optimizer has taken on these weights.
    `accelerator`: the stream and copy calls to use (default: those of `device`; tests pass a fake).
    """
    if cfg.tier == "none":
        raise ConfigError("stream_ needs stream.tier=cpu or stream.tier=disk")
    device = torch.device(device)
    _, layers = find_block_list(model, blocks_path)
    compute = next(p for p in layers[0].parameters() if p.is_floating_point()).dtype
    storage = DTYPES[cfg.storage_dtype] if cfg.storage_dtype else compute
    precision = Precision.resolve(storage, compute)
    accelerator = accelerator if accelerator is not None else Accelerator.for_device(device)
    _to_device_outside(model, layers, device)
    if cfg.tier == "cpu":
        pinned = accelerator if accelerator is not None and accelerator.pins else None
        blocks = []
        for block in layers:
            named = [(n, p, storage if p.is_floating_point() else p.dtype)  # quantized values keep their dtype
                     for n, p in block.named_parameters()]
            blocks.append(_host_block(named, pinned) if pinned else
                          {n: _host_copy(p.data, dtype) for n, p, dtype in named})
            for _, p, _ in named:
                p.data = hollow(p, device)
        tier = RamTier(blocks, pinned, at_step)
    else:
        write_folder(model, cfg.dir, storage, blocks_path, at_step, log=log)
        tier = DiskTier(cfg.dir)
        for block in layers:
            for p in block.parameters():
                p.data = hollow(p, device)
    where = 'host memory' if cfg.tier == 'cpu' else cfg.dir
    log(f"streaming {len(layers)} blocks from {where}{quantized_note(layers)}: {precision.reason}")
    engine = StreamEngine(model, tier, layers, device, precision, cfg.prefetch, log, accelerator)
    engine.device_blocks = cfg.device_blocks or engine.device_blocks
    return engine


def _host_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in host memory as `dtype`: `t` itself when it already is, else one copy."""
    if t.device.type == "cpu" and t.dtype == dtype:
        return t
    return torch.empty(t.shape, dtype=dtype).copy_(t)


def _host_block(named: list, accelerator) -> dict[str, torch.Tensor]:
    """A block's tensors copied into one exact page-locked slab."""
    stored = host_views([(n, p.shape, dtype) for n, p, dtype in named], accelerator)
    for n, p, _ in named:
        stored[n].copy_(p.data)
    return stored


def _to_device_outside(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Parameters outside the blocks, and every buffer, to the compute device."""
    inside = {id(p) for p in layers.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in inside and p.device != device:
                p.data = p.data.to(device)
        for module in model.modules():
            for name, b in module._buffers.items():
                if b is not None and b.device != device:
                    module._buffers[name] = b.to(device)


def unstream_(model: nn.Module, engine: StreamEngine) -> None:
    """Bring the blocks back into the model (resident on the compute device) and close the engine."""
    engine.flush()
    for j in range(len(engine.layers)):
        values, _ = engine.tier.read(j)
        for n, p in engine.params[j].items():
            t = values[n]
            p.data = t.to(engine.device, engine.precision.compute if t.is_floating_point() else t.dtype).clone()
    engine.close()
