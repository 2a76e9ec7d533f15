"""The disk format of a stream folder (`zotune-stream/1`), and `BlockWriter`, which writes a new one.

Disk format (`zotune-stream/1`), one folder:
- `manifest.json`: the HF config, the blocks path, the storage dtype, a fingerprint, and for each
  block its file and the (name, shape, dtype, offset) of every tensor;
- `block-NNNNN.bin`: a 4 KiB header (magic, fingerprint, block index) then the tensors, 64-byte aligned;
- `block-NNNNN.slots.bin`: for the tensors that train, float32 copies in two slots written in turn
  (with float32 storage, slot 0 is the tensor's place in the block file itself);
- `rest.safetensors`: everything outside the blocks (embeddings, final norm, head, buffers);
- `block-NNNNN.state-S.safetensors`: with a method that keeps per-tensor state (momentum, Adam's
  moments, HiZOO's Hessian, Sparse MeZO's threshold and mask of the step), that state as it was
  when slot S was written, `<tensor name>::<key>` (numbers as 0-d tensors);
- `state.bin`: one fixed-size record per block: the state of each slot and which one is current.
A write-back goes to the slot that is not current (weights, then optimizer state), then one small
record write makes it current:
a kill at any moment leaves every block whole, and the slot before it is there for a resume that
needs to go back one step (a kill during a step whose record never reached the log).
Blocks are read with positional reads into reused buffers, never memory-mapped, so they count
neither as anonymous memory nor as mapped file pages of the process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune.config import ConfigError
from zotune.files import check_new_folder
from zotune.models import DTYPES

FORMAT = "zotune-stream/1"
MAGIC = b"ZOTUNE-BLOCK-1\0\0"
HEADER = 4096
ALIGN = 64
BLOCK_HEADER = struct.Struct("<16s32sq")  # magic, fingerprint (hex digest prefix), block index
RECORD = struct.Struct("<qqqqqqq")  # per slot (version, perturbed step or -1, its seed) x 2, current slot

TENSOR_DTYPES = {**DTYPES, "int8": torch.int8, "uint8": torch.uint8}  # float blocks, and quantized ones (zotune.quant)
DTYPE_NAMES = {v: k for k, v in TENSOR_DTYPES.items()}


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def layout(named: list[tuple[str, tuple[int, ...], torch.dtype]], start: int = HEADER) -> tuple[list[Spec], int]:
    """Specs with aligned offsets from `start`, and the end offset."""
    specs, off = [], start
    for name, shape, dtype in named:
        spec = Spec(name, tuple(shape), dtype, off)
        specs.append(spec)
        off += (spec.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return specs, off


def views(buf: torch.Tensor, specs: list[Spec], base: int) -> dict[str, torch.Tensor]:
    """Typed tensor views into a uint8 buffer that holds the bytes from file offset `base` on."""
    out = {}
    for s in specs:
        raw = buf[s.offset - base: s.offset - base + s.nbytes]
        out[s.name] = raw.view(s.dtype).view(s.shape)
    return out


def fingerprint(config: dict, blocks: list[list[tuple[str, tuple, torch.dtype]]]) -> str:
    """Identifies a model's architecture and tensor layout (not its values): detects foreign shards."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for j, named in enumerate(blocks):
        for name, shape, dtype in named:
            h.update(f"{j}:{name}:{tuple(shape)}:{DTYPE_NAMES[dtype]};".encode())
    return h.hexdigest()


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_source(folder: Path, model: str, identity: str) -> None:
    """Name in the manifest the model a folder was written from, and its weights' identity
    (`zotune.files.weights_identity`), so that the folder is never taken for another model's."""
    manifest = json.loads((folder / "manifest.json").read_text())
    atomic_write(folder / "manifest.json", json.dumps({**manifest, "source": {"model": model, "identity": identity}},
                                                       indent=1))


def recorded_source(folder: Path) -> dict | None:
    """{"model", "identity"} of the model the folder was written from, or None (not recorded, or unreadable:
    opening the folder says why)."""
    try:
        return json.loads((folder / "manifest.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


class BlockWriter:
    """Writes a new stream folder block by block, so no more than one block is ever in memory."""

    def __init__(self, folder: str | Path, config: dict, blocks_path: str,
                 block_layouts: list[list[tuple[str, tuple, torch.dtype]]], storage_dtype: torch.dtype):
        self.folder = Path(folder)
        if (self.folder / "manifest.json").exists():
            raise ConfigError(f"{self.folder} already holds a stream folder; choose a new --out or delete it first")
        check_new_folder(self.folder, "the stream folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".write-test"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to {self.folder} ({e.strerror}); choose a writable folder") from None
        self.fingerprint = fingerprint(config, block_layouts)
        self._digest = hashlib.blake2b(digest_size=16)  # of the values written: identifies the run's base
        self.entries = []
        self.config, self.blocks_path, self.storage_dtype = config, blocks_path, storage_dtype
        self.layouts = block_layouts
        needed = sum(layout(named)[1] for named in block_layouts)
        free = free_bytes(self.folder)
        if free is not None and needed > free:
            raise ConfigError(f"{self.folder} has {free / 2**30:.1f} GiB free but the blocks need "
                              f"{needed / 2**30:.1f} GiB; free space or choose another folder")

    def write_block(self, j: int, tensors: dict[str, torch.Tensor]) -> None:
        specs, end = layout(self.layouts[j])
        name = f"block-{j:05d}.bin"
        path = self.folder / name
        try:
            with open(path, "wb") as f:
                f.write(BLOCK_HEADER.pack(MAGIC, self.fingerprint[:32].encode(), j).ljust(HEADER, b"\0"))
                for s in specs:
                    f.seek(s.offset)
                    t = tensors[s.name].detach().to("cpu", s.dtype).contiguous()
                    data = memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")
                    f.write(data)
                    self._digest.update(data)
                f.truncate(end)
        except OSError as e:
            path.unlink(missing_ok=True)
            why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
            raise ConfigError(f"could not write {path} ({why}); free space or choose another folder") from None
        self.entries.append({"file": name, "end": end, "tensors": [
            {"name": s.name, "shape": list(s.shape), "dtype": DTYPE_NAMES[s.dtype],
             "offset": s.offset} for s in specs]})

    def finish(self, rest: dict[str, torch.Tensor], at_step: int = 0) -> None:
        """Write what lies outside the blocks, the block states (all at `at_step`), then the manifest."""
        from safetensors.torch import save_file

        rest = {k: v.detach().cpu().contiguous() for k, v in rest.items()}
        for k in sorted(rest):
            self._digest.update(k.encode())
            self._digest.update(rest[k].view(-1).view(torch.uint8).numpy() if rest[k].numel() else b"")
        save_file(rest, str(self.folder / "rest.safetensors"))
        (self.folder / "state.bin").write_bytes(
            b"".join(RECORD.pack(at_step, -1, 0, at_step, -1, 0, 0) for _ in self.entries))
        atomic_write(self.folder / "manifest.json", json.dumps({
            "format": FORMAT, "fingerprint": self.fingerprint, "base_digest": self._digest.hexdigest(),
            "config": self.config,
            "blocks_path": self.blocks_path, "storage_dtype": DTYPE_NAMES[self.storage_dtype],
            "blocks": self.entries}, indent=1))


def free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (AttributeError, OSError):
        return None
    return st.f_bavail * st.f_frsize
