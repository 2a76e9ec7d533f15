"""Blocks in a folder of files between visits (`DiskTier`): the checkpoint of the blocks, larger than RAM.

The files are those of `zotune.stream.format`. A write-back goes to the slot that is not current, then
one small record write makes it current, so a kill at any moment leaves every block whole, with its
copy from before its last write-back for a resume that must go back one step.

One writer per folder: with several ranks (`join`), every rank computes the same update of every
block, but only one of them writes a given folder (the lowest rank that sees it; each machine's own
copy has its own writer). The others keep in memory the record they expect the folder to hold, and
read a block only once the writer's record says so: the two-slot protocol is correct for one writer,
and a second one that read the record after the first one's flip would overwrite the slot that
resume goes back to (and a sliced read could mix slots).
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import torch

from zotune.config import ConfigError
from zotune.parallel import SOLO, DivergedError
from zotune.stream.format import (
    BLOCK_HEADER,
    FORMAT,
    HEADER,
    MAGIC,
    RECORD,
    TENSOR_DTYPES,
    Spec,
    atomic_write,
    layout,
    views,
)
from zotune.stream.tier import BlockState

_UNWRITTEN = BlockState(version=-1)  # a slot that holds nothing yet: never gone back to


class DiskTier:
    """Blocks in a folder of files, read into reused buffers and written back tensor by tensor."""

    durable = True

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
            raise ConfigError(f"{manifest_path} has format {self.manifest.get('format')!r}, this "
                              f"zotune reads {FORMAT!r}")
        self.fingerprint = self.manifest["fingerprint"]
        self.specs: list[list[Spec]] = []
        self.ends: list[int] = []
        for j, entry in enumerate(self.manifest["blocks"]):
            specs = [Spec(t["name"], tuple(t["shape"]), TENSOR_DTYPES[t["dtype"]], t["offset"])
                     for t in entry["tensors"]]
            self.specs.append(specs)
            self.ends.append(entry["end"])
        self._files = [self._open_block(j) for j in range(len(self.specs))]
        self._state_file = self._open_state()
        self.bytes_read = self.bytes_written = 0  # to and from the slow tier, by this process (block files and slots)
        self._group, self._sliced = SOLO, None
        self._expected: list[tuple] | None = None  # not the folder's writer: the records it must hold, in memory
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
        magic, fp, index = BLOCK_HEADER.unpack(f.read(BLOCK_HEADER.size))
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
        if not path.exists() or path.stat().st_size != n * RECORD.size:
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
        """Give every named tensor of block j its two float32 slots (filled with its current value); a
        rank that does not write the folder finds them in `sync_ranks`."""
        if not self.writes:
            return
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
        atomic_write(self.folder / "slots.json", json.dumps(index))

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

    def join(self, group) -> None:
        """Serve the ranks of `group` (collective): the lowest rank that sees this folder writes it, the
        others follow; each rank reads its slice of every block and gathers the rest from its peers.

        Every rank needs every block; with W ranks each reads 1/W of it from the slow tier. Valid for
        one shared folder or a copy per machine alike: each copy has its own writer."""
        marker = self.folder / f".rank-{os.urandom(8).hex()}"  # which ranks see this very folder
        marker.touch()
        try:
            names = group.all_gather_object(marker.name)
            sharing = [r for r, name in enumerate(names) if (self.folder / name).exists()]
            group.barrier()  # every rank has looked before any marker goes
        finally:
            marker.unlink(missing_ok=True)
        self._group = group
        if sharing[0] != group.rank:
            self._expected = [self._on_disk(j) for j in range(len(self))]
        self._sliced = group.sliced_reads()

    @property
    def writes(self) -> bool:
        """Whether this process writes the folder (one process, or the writer of its ranks)."""
        return self._expected is None

    def sync_ranks(self) -> None:
        """After `add_masters` on every rank: the others open the slot files the writer created."""
        if self._group.world > 1:
            self._group.barrier()
            self.reload_slots()
            if not self.writes:
                self._expected = [self._on_disk(j) for j in range(len(self))]

    def _await_writer(self, j: int) -> None:
        """Until the writer has written block j as this rank expects it (its record is written last)."""
        deadline = time.monotonic() + self._group.dims.timeout
        while self._on_disk(j) != self._expected[j]:
            if time.monotonic() > deadline:
                raise DivergedError(f"rank {self._group.rank}: the writer of {self.folder} did not write block {j} "
                                   f"within {self._group.dims.timeout:.0f}s; it stopped or hangs")
            time.sleep(0.0005)

    def read(self, j: int, pool=None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """(block j as tensors, trained ones from their current slot in float32; the `pool` buffers used)."""
        if not self.writes:
            self._await_writer(j)
        size = self.ends[j] - HEADER
        buf = pool.take(size) if pool is not None else torch.empty(size, dtype=torch.uint8)
        out = views(buf, self.specs[j], HEADER)
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

    def values(self, j: int, names: list[str]) -> dict[str, torch.Tensor]:
        values, _ = self.read(j)
        return {n: values[n].clone() for n in names}  # not views that keep the whole block's buffer

    def host_storage(self, j: int) -> dict[str, torch.Tensor]:
        """No host tensor is the stored block: a write-back copies to host memory, then to the file."""
        return {}

    def write(self, j: int, tensors: dict[str, torch.Tensor], state: BlockState,
              opt_state: dict[str, dict] | None = None) -> None:
        """Write block j's trained tensors, and the optimizer state of each (by tensor name) when the
        method keeps one, to the slot that is not current, then make it current."""
        *states, current = self._record(j)
        slot = 1 - current
        if self.writes:
            self._write_slot(j, tensors, slot)
            self._write_opt_state(j, opt_state, slot)
        kept = states[current]
        self._write_record(j, state if slot == 0 else kept, state if slot == 1 else kept, slot)

    def _write_slot(self, j: int, tensors: dict[str, torch.Tensor], slot: int) -> None:
        for name, t in tensors.items():
            f, offset = self._place(j, name, slot)
            data = t.detach().to("cpu", torch.float32).contiguous()
            try:
                self.bytes_written += os.pwrite(f.fileno(),
                                                memoryview(data.view(-1).view(torch.uint8).numpy()).cast("B"),
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
                    flat[numbers[-1]] = torch.tensor(value,
                                                     dtype=torch.int64 if isinstance(value, int) else torch.float64)
        tmp = path.with_name(f".{path.name}.tmp")
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

    def _on_disk(self, j: int) -> tuple:
        return RECORD.unpack(os.pread(self._state_file.fileno(), RECORD.size, j * RECORD.size))

    def _record(self, j: int) -> tuple[BlockState, BlockState, int]:
        v0, p0, s0, v1, p1, s1, current = self._on_disk(j) if self.writes else self._expected[j]
        return BlockState(v0, p0, s0), BlockState(v1, p1, s1), current

    def _write_record(self, j: int, slot0: BlockState, slot1: BlockState, current: int) -> None:
        record = (slot0.version, slot0.perturbed, slot0.seed, slot1.version, slot1.perturbed, slot1.seed, current)
        if not self.writes:
            self._expected[j] = record
            return
        # One small positional write: a kill leaves either the old record or the new one.
        os.pwrite(self._state_file.fileno(), RECORD.pack(*record), j * RECORD.size)

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
