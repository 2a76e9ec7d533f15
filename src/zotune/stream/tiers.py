"""Where streamed blocks live between visits: host memory (`RamTier`) or a folder of block files (`DiskTier`).

A tier stores, for each transformer block, its parameters by name, and a small state per block
(how many updates it has had, and whether it holds the perturbation of an unfinished step) so that
the engine can bring any block up to date lazily, and a disk-tier run can resume after a kill.

Trainable tensors are kept as float32 "masters" whatever the storage dtype: MeZO-sized updates
(about 1e-7 relative) are below a 16-bit format's resolution and would round away.

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
from zotune.models import DTYPES

FORMAT = "zotune-stream/1"
MAGIC = b"ZOTUNE-BLOCK-1\0\0"
HEADER = 4096
ALIGN = 64
_HEADER = struct.Struct("<16s32sq")  # magic, fingerprint (hex digest prefix), block index
_STATE = struct.Struct("<qqqqqqq")  # per slot (version, perturbed step or -1, its seed) x 2, current slot

TENSOR_DTYPES = {**DTYPES, "int8": torch.int8, "uint8": torch.uint8}  # float blocks, and quantized ones (zotune.quant)
DTYPE_NAMES = {v: k for k, v in TENSOR_DTYPES.items()}


@dataclass
class BlockState:
    """How far a stored block is: `version` updates applied, plus maybe the moves of step `perturbed`."""

    version: int = 0
    perturbed: int = -1  # the step whose probe moves the stored values carry, or -1
    seed: int = 0  # that step's seed (to take the moves back if the step never finished)


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


_UNWRITTEN = BlockState(version=-1)  # a slot that holds nothing yet: never gone back to


def layout(named: list[tuple[str, tuple[int, ...], torch.dtype]], start: int = HEADER) -> tuple[list[Spec], int]:
    """Specs with aligned offsets from `start`, and the end offset."""
    specs, off = [], start
    for name, shape, dtype in named:
        spec = Spec(name, tuple(shape), dtype, off)
        specs.append(spec)
        off += (spec.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return specs, off


def _views(buf: torch.Tensor, specs: list[Spec], base: int) -> dict[str, torch.Tensor]:
    """Typed tensor views into a uint8 buffer that holds the bytes from file offset `base` on."""
    out = {}
    for s in specs:
        raw = buf[s.offset - base: s.offset - base + s.nbytes]
        out[s.name] = raw.view(s.dtype).view(s.shape)
    return out


class RamTier:
    """Blocks in host memory (page-locked when the compute device is a GPU, so copies run async).

    `blocks[j]` maps parameter name -> stored tensor. On a CPU compute device with matching dtypes
    the stored tensors are computed on directly: fetch and write-back cost nothing.
    """

    kind = "cpu"

    def __init__(self, blocks: list[dict[str, torch.Tensor]], pin: bool = False):
        self.blocks, self.pin = blocks, pin
        self.states = [BlockState() for _ in blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def add_masters(self, j: int, names: list[str]) -> None:
        for name in names:
            t = self.blocks[j][name]
            if t.dtype != torch.float32:  # one copy, straight into page-locked memory when the tier pins
                self.blocks[j][name] = torch.empty(t.shape, dtype=torch.float32, pin_memory=self.pin).copy_(t)

    def set_master(self, j: int, name: str, value: torch.Tensor) -> None:
        """The float32 master of a trained tensor of block j, set to `value` (after `add_masters`)."""
        self.blocks[j][name].copy_(value)

    def read(self, j: int, pool=None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """(block j's stored tensors, no pool buffers): nothing is copied."""
        return dict(self.blocks[j]), []

    def host_storage(self, j: int) -> dict[str, torch.Tensor]:
        """Where a write-back of block j may copy its tensors directly: their stored tensors."""
        return self.blocks[j]

    def write(self, j: int, tensors: dict[str, torch.Tensor], state: BlockState, opt_state=None) -> None:
        """Block j's trained tensors back in place (the optimizer state stays in the engine's hands)."""
        for name, t in tensors.items():
            stored = self.blocks[j][name]
            if t.data_ptr() != stored.data_ptr():
                stored.copy_(t, non_blocking=False)
        self.states[j] = state

    def get_state(self, j: int) -> BlockState:
        return self.states[j]


def fingerprint(config: dict, blocks: list[list[tuple[str, tuple, torch.dtype]]]) -> str:
    """Identifies a model's architecture and tensor layout (not its values): detects foreign shards."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for j, named in enumerate(blocks):
        for name, shape, dtype in named:
            h.update(f"{j}:{name}:{tuple(shape)}:{DTYPE_NAMES[dtype]};".encode())
    return h.hexdigest()


class DiskTier:
    """Blocks in a folder of files, read into reused buffers and written back tensor by tensor."""

    kind = "disk"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.exists():
            raise ConfigError(f"{self.folder} is not a zotune stream folder (no manifest.json); create one with "
                              f"`zotune stream prepare --model NAME --out {self.folder}`")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except ValueError as e:
            raise ConfigError(f"{manifest_path} is damaged ({e}); prepare the folder again") from None
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"{manifest_path} has format {self.manifest.get('format')!r}, this zotune reads {FORMAT!r}")
        self.fingerprint = self.manifest["fingerprint"]
        self.specs: list[list[Spec]] = []
        self.ends: list[int] = []
        for j, entry in enumerate(self.manifest["blocks"]):
            specs = [Spec(t["name"], tuple(t["shape"]), TENSOR_DTYPES[t["dtype"]], t["offset"]) for t in entry["tensors"]]
            self.specs.append(specs)
            self.ends.append(entry["end"])
        self._files = [self._open_block(j) for j in range(len(self.specs))]
        self._state_file = self._open_state()
        self.bytes_read = self.bytes_written = 0  # to and from the slow tier, by this process (block files and slots)
        self._sliced = None
        self.slots: dict[int, list[Spec]] = {}  # block -> float32 layout of its trained tensors in the slots file
        self._slot_files: dict[int, object] = {}
        self.reload_slots()

    def reload_slots(self) -> None:
        """Open the slot files that `slots.json` lists (again, after another rank created some)."""
        index_path = self.folder / "slots.json"
        if index_path.exists():
            for key, names in json.loads(index_path.read_text()).items():
                if [s.name for s in self.slots.get(int(key), [])] != names:
                    self._open_slots(int(key), names)

    # -- opening and checking -------------------------------------------------------------------

    def _block_path(self, j: int) -> Path:
        return self.folder / self.manifest["blocks"][j]["file"]

    def _slots_path(self, j: int) -> Path:
        return self.folder / f"block-{j:05d}.slots.bin"

    def _in_block_file(self, j: int) -> bool:
        """Slot 0 of block j is the block file itself when its trained tensors are stored in float32."""
        return all(self._spec(j, s.name).dtype == torch.float32 for s in self.slots[j])

    def _open_slots(self, j: int, names: list[str]) -> None:
        specs, end = layout([(n, self._spec(j, n).shape, torch.float32) for n in names], start=0)
        self.slots[j] = specs
        self._slot_files[j] = self._open(self._slots_path(j), end * (1 if self._in_block_file(j) else 2))

    def _place(self, j: int, name: str, slot: int) -> tuple[object, int]:
        """(file, offset) of trained tensor `name` of block j in `slot`."""
        spec = next(s for s in self.slots[j] if s.name == name)
        if self._in_block_file(j):
            return (self._files[j], self._spec(j, name).offset) if slot == 0 else (self._slot_files[j], spec.offset)
        region = self.slots[j][-1].offset + self.slots[j][-1].nbytes
        return self._slot_files[j], spec.offset + slot * region

    def _open(self, path: Path, min_size: int):
        if not path.exists():
            raise ConfigError(f"{path} is missing from the stream folder {self.folder}; prepare the folder again "
                              f"(`zotune stream prepare`)")
        size = path.stat().st_size
        if size < min_size:
            raise ConfigError(f"{path} is truncated ({size} of {min_size} bytes); prepare the folder again")
        try:
            return open(path, "r+b", buffering=0)
        except PermissionError:
            raise ConfigError(f"{path} is read-only: training writes the updated blocks back; copy the folder "
                              f"somewhere writable or fix its permissions") from None

    def _open_block(self, j: int):
        path = self._block_path(j)
        f = self._open(path, self.ends[j])
        magic, fp, index = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise ConfigError(f"{path} is not a zotune block file; prepare the folder again")
        if fp.decode() != self.fingerprint[:32] or index != j:
            raise ConfigError(f"{path} belongs to another model or position (fingerprint {fp.decode()[:12]}, block "
                              f"{index}; this folder expects {self.fingerprint[:12]}, block {j}): "
                              f"do not mix files of different stream folders")
        return f

    def _open_state(self):
        path = self.folder / "state.bin"
        n = len(self.specs)
        if not path.exists() or path.stat().st_size != n * _STATE.size:
            raise ConfigError(f"{path} is missing or damaged; prepare the folder again")
        try:
            return open(path, "r+b", buffering=0)
        except PermissionError:
            raise ConfigError(f"{path} is read-only: training needs to write to the stream folder") from None

    def _spec(self, j: int, name: str) -> Spec:
        for s in self.specs[j]:
            if s.name == name:
                return s
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.specs)

    # -- two float32 slots for the tensors that train ------------------------------------------------

    def add_masters(self, j: int, names: list[str]) -> None:
        """Give every named tensor of block j its two float32 slots (filled with its current value)."""
        have = [s.name for s in self.slots.get(j, [])]
        missing = [n for n in names if n not in have]
        if not missing:
            return
        values, _ = self.read(j)
        state = self.get_state(j)
        if j in self._slot_files:
            self._slot_files[j].close()
        all_names = have + missing
        specs, end = layout([(n, self._spec(j, n).shape, torch.float32) for n in all_names], start=0)
        in_block = all(self._spec(j, n).dtype == torch.float32 for n in all_names)
        tmp = self._slots_path(j).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.truncate(end * (1 if in_block else 2))
        os.replace(tmp, self._slots_path(j))
        self._open_slots(j, all_names)
        if not (in_block and not have):  # else slot 0 is the block file, which holds these values already
            self._write_slot(j, {n: values[n] for n in all_names}, 0)
        self._write_record(j, state, _UNWRITTEN, 0)  # slot 1 is written by the first write-back
        index = {str(k): [s.name for s in v] for k, v in sorted(self.slots.items())}
        _atomic_write(self.folder / "slots.json", json.dumps(index))

    # -- reading and writing ----------------------------------------------------------------------

    def _read_into(self, f, buf: torch.Tensor, offset: int) -> None:
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < len(view):
            f.seek(offset + done)
            n = f.readinto(view[done:])
            if not n:
                raise ConfigError(f"{f.name} ended early: the stream folder is damaged; prepare it again")
            done += n
        self.bytes_read += len(view)

    def share_reads(self, group) -> None:
        """Read each block in slices across the ranks of `group` and gather the rest from the peers.

        Every rank needs every block; with W ranks each reads 1/W of it from the slow tier. Valid for
        one shared folder or a copy per machine alike, since every rank writes the same updates.
        """
        self._sliced = _SlicedReads(group)

    def read(self, j: int, pool=None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """(block j as tensors, trained ones from their current slot in float32; the `pool` buffers used)."""
        size = self.ends[j] - HEADER
        buf = pool.take(size) if pool is not None else torch.empty(size, dtype=torch.uint8)
        out = _views(buf, self.specs[j], HEADER)
        reads, skip = [], []  # (file, offset, destination bytes); block-file ranges another slot provides
        if j in self.slots:
            current = self._record(j)[-1]
            for s in self.slots[j]:
                f, offset = self._place(j, s.name, current)
                if f is self._files[j]:
                    continue  # read with the block
                if out[s.name].dtype != torch.float32:
                    out[s.name] = torch.empty(s.shape, dtype=torch.float32, pin_memory=buf.is_pinned())
                else:  # its place in the block file holds the other slot: do not read it
                    spec = self._spec(j, s.name)
                    skip.append((spec.offset, spec.offset + spec.nbytes))
                reads.append((f, offset, out[s.name].view(-1).view(torch.uint8)))
        at = HEADER
        for lo, hi in sorted(skip) + [(self.ends[j], self.ends[j])]:
            if lo > at:
                reads.insert(0, (self._files[j], at, buf[at - HEADER: lo - HEADER]))
            at = max(at, hi)
        if self._sliced is not None and pool is not None:  # the engine's fetches; direct reads stay local
            self._sliced.read(reads, self._read_into)
        else:
            for f, offset, dest in reads:
                self._read_into(f, dest, offset)
        return out, ([buf] if pool is not None else [])

    def host_storage(self, j: int) -> dict[str, torch.Tensor]:
        """No host tensor is the stored block: a write-back copies to host memory, then to the file."""
        return {}

    def write(self, j: int, tensors: dict[str, torch.Tensor], state: BlockState,
              opt_state: dict[str, dict] | None = None) -> None:
        """Write block j's trained tensors, and the optimizer state of each (by tensor name) when the
        method keeps one, to the slot that is not current, then make it current."""
        *states, current = self._record(j)
        slot = 1 - current
        self._write_slot(j, tensors, slot)
        self._write_opt_state(j, opt_state, slot)
        kept = states[current]
        self._write_record(j, state if slot == 0 else kept, state if slot == 1 else kept, slot)

    def _write_slot(self, j: int, tensors: dict[str, torch.Tensor], slot: int) -> None:
        for name, t in tensors.items():
            f, offset = self._place(j, name, slot)
            data = t.detach().to("cpu", torch.float32).contiguous()
            try:
                self.bytes_written += os.pwrite(f.fileno(), memoryview(data.view(-1).view(torch.uint8).numpy()).cast("B"),
                                                offset)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise ConfigError(f"the disk of {self.folder} is full while writing block {j}") from None
                raise

    def _state_path(self, j: int, slot: int) -> Path:
        return self.folder / f"block-{j:05d}.state-{slot}.safetensors"

    def _write_opt_state(self, j: int, opt_state: dict[str, dict] | None, slot: int) -> None:
        """The optimizer state of slot `slot`: a new file put in place whole (a kill leaves the old one)."""
        if opt_state is None:  # a method without state (the engine then never reads state files)
            return
        path = self._state_path(j, slot)
        from safetensors.torch import save_file

        flat, numbers = {}, []
        for name, entries in opt_state.items():
            for key, value in entries.items():
                if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
                    raise TypeError(f"optimizer state {key!r} of {name} is a {type(value).__name__}; the disk tier "
                                    f"stores tensors and numbers")
                if torch.is_tensor(value):
                    flat[f"{name}::{key}"] = value.detach().cpu().contiguous()
                else:
                    numbers.append(f"{name}::{key}")
                    flat[numbers[-1]] = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per rank: ranks write the same bytes
        try:
            save_file(flat, str(tmp), metadata={"numbers": json.dumps(numbers)})
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise ConfigError(f"the disk of {self.folder} is full while writing the optimizer state of "
                                  f"block {j}") from None
            raise

    def read_opt_state(self, j: int) -> dict[str, dict]:
        """The optimizer state of block j's current slot by tensor name ({} when it has none yet)."""
        from safetensors import safe_open

        path = self._state_path(j, self._record(j)[-1])
        if not path.exists():
            return {}
        out: dict[str, dict] = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                numbers = set(json.loads((f.metadata() or {}).get("numbers", "[]")))
                for flat_key in f.keys():
                    name, key = flat_key.split("::", 1)
                    t = f.get_tensor(flat_key)
                    out.setdefault(name, {})[key] = t.item() if flat_key in numbers else t
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for a damaged file
            raise ConfigError(f"{path} is damaged ({e}); the optimizer state of block {j} is lost: start the run "
                              f"again from a fresh stream folder") from None
        return out

    def _record(self, j: int) -> tuple[BlockState, BlockState, int]:
        v0, p0, s0, v1, p1, s1, current = _STATE.unpack(os.pread(self._state_file.fileno(), _STATE.size, j * _STATE.size))
        return BlockState(v0, p0, s0), BlockState(v1, p1, s1), current

    def _write_record(self, j: int, slot0: BlockState, slot1: BlockState, current: int) -> None:
        # One small positional write: a kill leaves either the old record or the new one.
        os.pwrite(self._state_file.fileno(), _STATE.pack(slot0.version, slot0.perturbed, slot0.seed, slot1.version,
                                                         slot1.perturbed, slot1.seed, current), j * _STATE.size)

    def previous(self, j: int) -> BlockState:
        """The state of block j's other slot: the block as it was before its last write-back."""
        *states, current = self._record(j)
        return states[1 - current]

    def go_back(self, j: int) -> None:
        """Make block j's other slot current again (its last write-back belongs to a step the log lacks)."""
        *states, current = self._record(j)
        self._write_record(j, states[0], states[1], 1 - current)

    def get_state(self, j: int) -> BlockState:
        *states, current = self._record(j)
        return states[current]

    def close(self) -> None:
        for f in [*self._files, *self._slot_files.values(), self._state_file]:
            f.close()


class _SlicedReads:
    """Reads a list of byte ranges across ranks: each rank reads 1/W of the bytes, then all-gather.

    Runs in the engine's transfer thread, on its own gloo group, so its collectives never interleave
    with the main thread's; every rank fetches the same blocks in the same order.
    """

    def __init__(self, group):
        import torch.distributed as dist

        self.rank, self.world = group.rank, group.world
        self.pg = dist.new_group(backend="gloo")  # collective: every rank creates it at the same point

    @staticmethod
    def _pieces(reads, lo: int, hi: int):
        """(file, file offset, destination slice) for the bytes [lo, hi) of the reads laid end to end."""
        at = 0
        for f, offset, dest in reads:
            n = dest.numel()
            a, b = max(lo, at), min(hi, at + n)
            if a < b:
                yield f, offset + a - at, dest[a - at: b - at]
            at += n

    def read(self, reads, read_into) -> None:
        import torch.distributed as dist

        total = sum(dest.numel() for *_, dest in reads)
        chunk = -(-total // self.world)
        bounds = [(q * chunk, min((q + 1) * chunk, total)) for q in range(self.world)]
        lo, hi = bounds[self.rank]
        mine = torch.zeros(chunk, dtype=torch.uint8)
        at = 0
        for f, offset, dest in self._pieces(reads, lo, hi):
            read_into(f, dest, offset)
            mine[at: at + dest.numel()] = dest
            at += dest.numel()
        gathered = [torch.empty(chunk, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(gathered, mine, group=self.pg)
        for q, (a, b) in enumerate(bounds):
            if q == self.rank:
                continue
            at = 0
            for _, _, dest in self._pieces(reads, a, b):
                dest.copy_(gathered[q][at: at + dest.numel()])
                at += dest.numel()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class BlockWriter:
    """Writes a new stream folder block by block, so no more than one block is ever in memory."""

    def __init__(self, folder: str | Path, config: dict, blocks_path: str,
                 block_layouts: list[list[tuple[str, tuple, torch.dtype]]], storage_dtype: torch.dtype):
        self.folder = Path(folder)
        if (self.folder / "manifest.json").exists():
            raise ConfigError(f"{self.folder} already holds a stream folder; choose a new --out or delete it first")
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
        free = _free_bytes(self.folder)
        if free is not None and needed > free:
            raise ConfigError(f"{self.folder} has {free / 2**30:.1f} GiB free but the blocks need "
                              f"{needed / 2**30:.1f} GiB; free space or choose another folder")

    def write_block(self, j: int, tensors: dict[str, torch.Tensor]) -> None:
        specs, end = layout(self.layouts[j])
        name = f"block-{j:05d}.bin"
        path = self.folder / name
        try:
            with open(path, "wb") as f:
                f.write(_HEADER.pack(MAGIC, self.fingerprint[:32].encode(), j).ljust(HEADER, b"\0"))
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
            {"name": s.name, "shape": list(s.shape), "dtype": DTYPE_NAMES[s.dtype], "offset": s.offset} for s in specs]})

    def finish(self, rest: dict[str, torch.Tensor], at_step: int = 0) -> None:
        """Write what lies outside the blocks, the block states (all at `at_step`), then the manifest."""
        from safetensors.torch import save_file

        rest = {k: v.detach().cpu().contiguous() for k, v in rest.items()}
        for k in sorted(rest):
            self._digest.update(k.encode())
            self._digest.update(rest[k].view(-1).view(torch.uint8).numpy() if rest[k].numel() else b"")
        save_file(rest, str(self.folder / "rest.safetensors"))
        (self.folder / "state.bin").write_bytes(
            b"".join(_STATE.pack(at_step, -1, 0, at_step, -1, 0, 0) for _ in self.entries))
        _atomic_write(self.folder / "manifest.json", json.dumps({
            "format": FORMAT, "fingerprint": self.fingerprint, "base_digest": self._digest.hexdigest(),
            "config": self.config,
            "blocks_path": self.blocks_path, "storage_dtype": DTYPE_NAMES[self.storage_dtype],
            "blocks": self.entries}, indent=1))


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (AttributeError, OSError):
        return None
    return st.f_bavail * st.f_frsize
