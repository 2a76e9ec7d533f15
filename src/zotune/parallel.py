"""Distributed ZO on torch.distributed: data, perturbation and 2D parallelism, applied from outside.

Every rank holds the whole (or streamed) model and the same step seeds. A step's probes are handed
out by perturbation rank, the batch rows by data rank; each rank runs the forwards of its probes on
its rows, and one all-reduce of the probe losses (a few floats, whatever the model size) gives every
rank the same projected gradient, hence the identical update. With one process the group is `SOLO`
(`Solo`: the same API, and nothing is sent), so no code asks whether there is a group.

Launch with torchrun (the process group comes from its environment variables; gloo on CPU, NCCL on
GPU): `torchrun --nproc-per-node 4 -m zotune train parallel.data=2 parallel.perturb=2 ...`.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zotune.config import ConfigError


@dataclass
class ParallelDims:
    """How the ranks divide a step: `data` ways over the batch rows, `perturb` ways over the probes.

    data x perturb must equal the number of processes torchrun starts. `timeout` (seconds) bounds
    every collective: a dead or hung rank stops the others with an error instead of a hang.
    `check_every`: every K steps the ranks compare a fingerprint of their weights (0: never).
    """

    data: int = 1
    perturb: int = 1
    timeout: float = 600.0
    check_every: int = 50

    def __post_init__(self):
        for name in ("data", "perturb"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"parallel.{name}={value} must be an integer >= 1")
        if not self.timeout > 0:
            raise ConfigError(f"parallel.timeout={self.timeout} must be > 0 seconds")
        if self.check_every < 0:
            raise ConfigError(f"parallel.check_every={self.check_every} must be >= 0")

    @property
    def world(self) -> int:
        return self.data * self.perturb

    def validate(self, world_size: int) -> None:
        if self.world != world_size:
            raise ConfigError(
                f"parallel.data={self.data} x parallel.perturb={self.perturb} = {self.world} processes, but "
                f"{world_size} were started; launch with `torchrun --nproc-per-node {self.world}` or change the dims")


class DivergedError(RuntimeError):
    """Ranks that must hold identical weights, seeds or configs do not."""


class Group:
    """This process's place in the run (rank, data and perturbation coordinates) and its collectives.

    Rank r has data coordinate r // perturb and perturbation coordinate r % perturb. Only scalars
    travel; `bytes_sent` counts the payload this rank contributes to collectives.
    """

    def __init__(self, dims: ParallelDims, rank: int = 0, device: torch.device | None = None):
        self.dims, self.rank = dims, rank
        self.world = dims.world
        self.data_rank, self.perturb_rank = divmod(rank, dims.perturb)
        self.device = device or torch.device("cpu")
        self.bytes_sent = 0

    @classmethod
    def from_env(cls, dims: ParallelDims, device: torch.device) -> Group:
        """The group of a torchrun launch (`SOLO` for a single process that asked for no parallelism)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dims.validate(world)
        if world == 1:
            return SOLO
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            bound = {}
            if device.type == "cuda":  # this process's own GPU (`resolve_device`), bound to its communicator
                torch.cuda.set_device(device)
                bound = {"device_id": device}
                # A dead peer makes NCCL's watchdog abort the process after the timeout, saying nothing of
                # zotune's; blocking waits raise instead, so the run stops with the dead-rank line
                os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=dims.timeout), **bound)
        return cls(dims, dist.get_rank(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- who does what ----------------------------------------------------------------------------

    def owns_probe(self, r: int) -> bool:
        return r % self.dims.perturb == self.perturb_rank

    def rows(self, n: int) -> tuple[slice, float]:
        """(this rank's rows of a batch of n rows, their share of the batch).

        Uneven batches (an epoch's last) split as evenly as they can; the share weights this
        rank's mean loss so that the all-reduced loss is the mean over all n rows.
        """
        d, i = self.dims.data, self.data_rank
        lo, hi = i * n // d, (i + 1) * n // d
        return slice(lo, hi), (hi - lo) / n

    # -- collectives ----------------------------------------------------------------------------

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.bytes_sent += t.numel() * t.element_size()
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        except Exception as e:  # noqa: BLE001 -- gloo/NCCL raise various types for a lost peer or a timeout
            raise DivergedError(f"rank {self.rank}: a collective failed ({str(e).splitlines()[0][:200]}); another "
                                f"rank stopped or timed out after {self.dims.timeout:.0f}s") from None
        return t.tolist()

    def probe_losses(self, mine: dict[int, float], n_probes: int, share: float = 1.0) -> list[float]:
        """Every probe's loss over the whole batch: one all-reduce of n_probes floats.

        Each rank adds its mean loss times its share of the rows; a probe this rank did not run adds
        0.0 (exact), so with data=1 the losses are bit for bit those of a single process.
        """
        return self._all_reduce([mine[r] * share if r in mine else 0.0 for r in range(n_probes)])

    def max(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, op="max")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (evaluation counts, stop flags)."""
        return self._all_reduce(values)

    def check_same(self, what: str, digest: Callable[[], bytes]) -> None:
        """Stop with a clear error unless every rank's `digest()` for `what` is the same (4 floats, one MAX)."""
        digest = digest()
        lo, hi = struct.unpack("<II", digest[:8])
        top = self._all_reduce([lo, hi, -lo, -hi], op="max")
        if top[0] != -top[2] or top[1] != -top[3]:
            raise DivergedError(f"the ranks disagree on {what} (rank {self.rank} has {digest[:8].hex()}); every rank "
                                f"must hold the same model, config and seed")

    def broadcast(self, obj):
        """rank 0's `obj` on every rank (used for decisions only rank 0 can make, e.g. from its files)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sliced_reads(self) -> SlicedReads:
        """A reader of byte ranges that reads 1/W of them on each rank (collective: every rank calls it)."""
        return SlicedReads(self)

    def barrier(self) -> None:
        import torch.distributed as dist

        # NCCL's barrier must be told this rank's GPU, or it guesses one from the rank (GPU 0 for all, at worst)
        dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


class Solo(Group):
    """The group of a single process: every probe and row is its own, every collective returns its
    input unchanged (bit for bit), and nothing is sent."""

    def __init__(self):
        super().__init__(ParallelDims(check_every=0))

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        return list(values)

    def probe_losses(self, mine: dict[int, float], n_probes: int, share: float = 1.0) -> list[float]:
        return [mine[r] for r in range(n_probes)]

    def check_same(self, what: str, digest: Callable[[], bytes]) -> None:
        pass  # (the digest is never computed)

    def broadcast(self, obj):
        return obj

    def all_gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


SOLO = Solo()


class SlicedReads:
    """Reads a list of byte ranges across ranks: each rank reads 1/W of the bytes, then all-gather.

    Runs in the engine's transfer thread, on its own gloo group, so its collectives never interleave
    with the main thread's; every rank fetches the same blocks in the same order. `read_into(file,
    destination bytes, offset)` is the tier's own reader.
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
        try:
            dist.all_gather(gathered, mine, group=self.pg)
        except Exception as e:  # noqa: BLE001 -- as in Group._all_reduce
            raise DivergedError(f"rank {self.rank}: a sliced read failed ({str(e).splitlines()[0][:200]}); another "
                                f"rank stopped") from None
        for q, (a, b) in enumerate(bounds):
            if q == self.rank:
                continue
            at = 0
            for _, _, dest in self._pieces(reads, a, b):
                dest.copy_(gathered[q][at: at + dest.numel()])
                at += dest.numel()


def weights_digest(tensors) -> bytes:
    """A cheap fingerprint of weights: a hash of a few thousand values spread over every tensor."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // 1024)
        h.update(flat[::stride].float().cpu().numpy().tobytes())
    return h.digest()


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()
