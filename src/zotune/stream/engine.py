"""The streaming engine: transformer blocks visit the compute device one at a time.

`engine = stream_(model, StreamConfig(...), device)` moves the blocks of any HF decoder-only model to a
storage tier and puts a forward pre-hook and a forward hook on each block (the model's own forward
runs unchanged). Then `engine.step(opt, closure)` takes one ZO step that visits each block once:

    fetch block j (block j+1 is fetched in the background meanwhile)
    apply its pending update from the previous step (regenerating that step's z)
    for each probe r of the method: move the block to probe r's point, let probe r's forward run
        through the block (each probe is the user's closure, running in its own thread, held at
        every block's entry until its turn: "lockstep")
    write back what changed (in the background) and leave the block at the last probe's point;
    the restore is fused into the next step's update, exactly as in the whole-model step.

The same moves, in the same order, on the same values as `opt.step(closure)` on a resident model:
streamed == resident bit for bit. Trainable tensors outside the blocks (final norm, tied embedding)
stay on the device; each probe sees its own copy of them while it runs. A method's per-tensor state
(`opt.tensor_state`: momentum, Adam's moments, HiZOO's Hessian, Sparse MeZO's threshold and mask of
the step) travels with its block: on the device while the block is there, and while it is away in
host memory (RAM tier) or in the block's slot on disk, written and made current with its weights
(disk tier), so that a disk-tier run killed at any moment resumes with the state of its blocks.

Outside `step` (evaluation, any forward) a block is fetched on demand, brought up to date and
released after use. `flush()` brings every block up to date: before a checkpoint and at the end.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.methods.zosgd import StepKey
from zotune.models import DTYPES, find_block_list
from zotune.precision import Precision
from zotune.stream.tiers import BlockState, DiskTier, RamTier

TIERS = ("none", "cpu", "disk")


@dataclass
class StreamConfig:
    """Where the blocks live and how they travel.

    tier: `none` (resident), `cpu` (host memory) or `disk` (a stream folder, `dir`); storage_dtype: how frozen block
    tensors are stored (default: the model's dtype; trained ones are always kept as float32
    masters); prefetch: how many blocks are fetched ahead of the one computing.
    """

    tier: str = "none"
    dir: str | None = None
    storage_dtype: str | None = None
    prefetch: int = 1

    def __post_init__(self):
        if self.tier not in TIERS:
            raise ConfigError(f"stream.tier={self.tier!r} is not known; use one of {', '.join(TIERS)}")
        if self.tier == "disk" and not self.dir:
            raise ConfigError("stream.tier=disk needs stream.dir=<folder for the block files> (--offload-dir)")
        if self.storage_dtype is not None and self.storage_dtype not in DTYPES:
            raise ConfigError(f"stream.storage_dtype={self.storage_dtype!r}; use one of {', '.join(DTYPES)}")
        if not (isinstance(self.prefetch, int) and self.prefetch >= 1):
            raise ConfigError(f"stream.prefetch={self.prefetch} must be an integer >= 1")


def refuse_unstreamable(method: type) -> None:
    """Raise, with the method's own reason, when the optimizer class `method` cannot be streamed."""
    if not getattr(method, "streamable", True):
        raise ConfigError(f"{method.__name__} cannot be streamed: {method.why_not_streamable}; stream any other "
                          f"method, or train it resident")


def keeps_state(opt) -> bool:
    """Whether `opt` keeps per-tensor state that must travel with a streamed block."""
    return bool(opt.state_floats() or getattr(opt, "replays_from_base", False))


def _moved(state: dict, device: torch.device) -> dict:
    """An optimizer state dict with its tensors on `device` (the same tensors when already there)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}


def _hollow(p: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A stand-in with p's shape and dtype and one element of storage (on `device`, default p's), for
    a block that is away: nothing of p is copied to build it."""
    return torch.zeros((), dtype=p.dtype, device=device or p.device).expand(p.shape)


def _flat_state(opt_state: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors of a block's optimizer state as `<tensor name>::<key>` (the disk tier's keys)."""
    return {f"{n}::{k}": v for n, entries in opt_state.items() for k, v in entries.items() if torch.is_tensor(v)}


def _unflat_state(opt_state: dict[str, dict], moved: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {n: {k: moved.get(f"{n}::{k}", v) for k, v in entries.items()} for n, entries in opt_state.items()}


class _Abort(BaseException):
    """Raised in a probe thread at a block entry when the step is being abandoned."""


class _Worker:
    """One background thread running transfer jobs in order, with a bounded queue (back-pressure)."""

    def __init__(self, depth: int):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="zotune-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 -- handed to whoever waits on the future
                fut.set_exception(e)

    def submit(self, fn: Callable) -> Future:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class Accelerator:
    """The device-generic calls the engine makes on an accelerator (`torch.cuda`, `torch.xpu`, ...).

    A side stream, events, asynchronous copies and `record_stream`: the calls of torchao's CPU
    offload, in one place, so that tests can put a fake in their place whose copies land only when
    waited for (`tests/fake_accelerator.py`). `for_device` returns None on the CPU and on a device
    without streams (MPS): the copies are then plain and synchronous.
    """

    pins = True  # host buffers are page-locked, so copies from them run asynchronously

    def __init__(self, device: torch.device):
        self.device = device
        self.module = getattr(torch, device.type)

    @classmethod
    def for_device(cls, device: torch.device) -> Accelerator | None:
        module = getattr(torch, device.type, None) if device.type != "cpu" else None
        return cls(device) if module is not None and hasattr(module, "Stream") else None

    def new_stream(self):
        return self.module.Stream(self.device)

    def using(self, stream):
        return self.module.stream(stream)

    def current_stream(self):
        return self.module.current_stream(self.device)

    def copy(self, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return t.to(device, dtype, non_blocking=True)

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)


class _Transfers:
    """Host <-> device copies: on a side stream with events through an `Accelerator`, plain without one."""

    def __init__(self, device: torch.device, accel: Accelerator | None = None):
        self.device = device
        self.accel = accel if accel is not None else Accelerator.for_device(device)
        self.stream = self.accel.new_stream() if self.accel is not None else None

    def to_device(self, host: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]):
        """(device tensors, event or None); a tensor already right (CPU, same dtype) is used as is."""
        if self.accel is None:
            return {n: t.to(self.device, dtypes[n]) for n, t in host.items()}, None
        with self.accel.using(self.stream):
            out = {n: self.accel.copy(t, self.device, dtypes[n]) for n, t in host.items()}
            event = self.stream.record_event()
        return out, event

    def wait(self, event, tensors: dict[str, torch.Tensor]) -> None:
        """Make the compute stream wait for a transfer (no host sync) and own its tensors."""
        if event is not None:
            compute = self.accel.current_stream()
            compute.wait_event(event)
            for t in tensors.values():  # allocated on the side stream, freed after use on the compute stream
                self.accel.record_stream(t, compute)

    def mark_compute(self):
        """An event on the compute stream: a write-back copy must not start before it."""
        return self.accel.current_stream().record_event() if self.accel is not None else None

    def to_host(self, tensors: dict[str, torch.Tensor], after, into: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """Device tensors in host memory, once copied: into `into[name]` where given (the tier's own
        storage: one copy, not two), else into new host tensors."""
        if self.accel is None:  # the tier copies them into place itself, when they are not its own storage
            return {n: t.cpu() for n, t in tensors.items()}
        into = into or {}
        self.stream.wait_event(after)
        out = {}
        with self.accel.using(self.stream):
            for n, t in tensors.items():
                self.accel.record_stream(t, self.stream)  # the caching allocator must not reuse t before the copy ends
                if n in into:
                    self.accel.copy_into(into[n], t)
                    out[n] = into[n]
                else:
                    out[n] = self.accel.copy(t, torch.device("cpu"), t.dtype)
            done = self.stream.record_event()
        done.synchronize()
        return out


class _Pool:
    """Reused host buffers by size (page-locked for an accelerator), so reads never reallocate."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: torch.Tensor | None) -> None:
        if buf is not None:
            with self._lock:
                self._free.setdefault(buf.numel(), []).append(buf)


@dataclass
class _Resident:
    """A block on the compute device: its tensors by name (float32 masters for trained ones)."""

    tensors: dict[str, torch.Tensor]
    host: list[torch.Tensor]  # pool buffers to give back after the write-back
    changed: bool = False


class StreamEngine:
    """Streams a model's blocks; see the module docstring. Made by `stream_`, undone by `unstream_`."""

    def __init__(self, model: nn.Module, tier, layers: nn.ModuleList, device: torch.device,
                 precision: Precision, prefetch: int = 1, log=print, accelerator: Accelerator | None = None):
        self.model, self.tier, self.layers, self.device = model, tier, layers, torch.device(device)
        self.precision, self.prefetch, self.log = precision, prefetch, log
        self.params: list[dict[str, nn.Parameter]] = [dict(b.named_parameters()) for b in layers]
        self.states = [tier.get_state(j) for j in range(len(layers))]
        self.version = 0  # steps completed: a settled block has had this many updates
        self.history: dict[int, object] = {}  # step index -> StepRecord, for blocks still to settle
        self._opt = None
        self._host_state: dict[int, dict] = {}  # tensor index -> its optimizer state while its block is away
        self._state_on_disk = False  # the disk tier holds the state of an optimizer that keeps one
        self._trainable: list[list[tuple[int, str]]] = [[] for _ in layers]  # per block: (index i, name)
        self.outside: list[tuple[int, torch.Tensor]] = []  # trained tensors that stay on the device (or their masters)
        self._compute: dict[int, nn.Parameter] = {}  # index -> the 16-bit model tensor of an outside master
        self._resident: dict[int, _Resident] = {}
        self._fetches: dict[int, Future] = {}
        self._writes: list[Future] = []
        self._transfers = _Transfers(self.device, accelerator)
        self._pool = _Pool(pin=self._transfers.accel is not None and self._transfers.accel.pins)
        self._worker = _Worker(depth=2 * prefetch + 2)
        self._probe = threading.local()  # .lockstep and .r in a probe thread
        self._step: _Lockstep | None = None
        self._hooks = []
        last = len(layers) - 1
        for j, block in enumerate(layers):
            self._hooks.append(block.register_forward_pre_hook(lambda m, a, j=j: self._enter(j)))
            self._hooks.append(block.register_forward_hook(lambda m, a, o, j=j: self._exit(j, j == last)))

    # -- the optimizer ----------------------------------------------------------------------------

    def attach(self, opt, masters: dict[int, torch.Tensor] | None = None) -> None:
        """Use `opt`'s trainable tensors and tensor indices (its direction seeds).

        `masters`: float32 values of trained tensors by tensor index, to start their masters from instead
        of the model's 16-bit values (a RAM-tier run restored from its snapshot and log)."""
        if self._opt is opt:
            return
        if self._opt is not None:
            raise ConfigError("this streamed model already trains with another optimizer; make one engine per optimizer")
        refuse_unstreamable(type(opt))
        index = {id(p): i for i, p in opt.indexed()}
        in_blocks = set()
        group = getattr(opt, "group", None)
        creates = group is None or group.is_main or not isinstance(self.tier, DiskTier)  # one writer per folder
        for j, named in enumerate(self.params):
            self._trainable[j] = [(index[id(p)], n) for n, p in named.items() if id(p) in index]
            in_blocks |= {id(p) for p in named.values()}
            if self._trainable[j] and creates:
                self.tier.add_masters(j, [n for _, n in self._trainable[j]])
                for i, n in self._trainable[j] if masters else ():
                    if i in masters:
                        self.tier.set_master(j, n, masters[i])
        if group is not None and isinstance(self.tier, DiskTier):
            group.barrier()
            self.tier.reload_slots()
        # Trained tensors outside the blocks stay on the device; a 16-bit one (a final norm, tied embeddings)
        # trains a float32 master there, as block tensors do on the tier, and the model reads its rounding.
        self.outside, self._compute = [], {}
        for i, p in opt.indexed():
            if id(p) in in_blocks:
                continue
            if p.dtype == torch.float32:
                self.outside.append((i, p))
            else:
                self._compute[i] = p
                start = masters[i] if masters and i in masters else p.data
                self.outside.append((i, start.detach().to(p.device, torch.float32, copy=True)))
        for j in range(len(self.layers)):  # state the optimizer holds already (a resumed run)
            if j not in self._resident:
                self._state_away(j, opt)
        self.version = opt.steps
        self._opt = opt
        self._state_on_disk = isinstance(self.tier, DiskTier) and keeps_state(opt)
        for j in list(self._fetches):  # fetched before the optimizer was known: without its state, fetch again
            _, _, keep, pooled, _ = self._fetches.pop(j).result()
            for buf in [*keep, *pooled]:
                self._pool.give(buf)

    def share_reads(self, group) -> None:
        """With a process group and the disk tier, each rank reads its slice of every block and the
        ranks all-gather the rest; otherwise (host memory, one process) every rank fetches whole blocks."""
        if group is not None and group.world > 1 and isinstance(self.tier, DiskTier):
            self.tier.share_reads(group)

    def restore(self, records: list) -> None:
        """Check the tier against a run's log and keep its records, so every block can catch up.

        A block written during a step that never reached the log (the run was killed inside it)
        goes back to its previous slot, from before that step: the resume is exact. A block
        ahead of the log belongs to another run and is refused.
        """
        n = len(records)
        back = []
        for j, st in enumerate(self.states):
            if st.perturbed >= n and hasattr(self.tier, "previous"):
                prev = self.tier.previous(j)
                if 0 <= prev.version <= n and prev.perturbed < n:
                    self.tier.go_back(j)
                    self.states[j] = prev
                    back.append(j)
        if back:
            self.log(f"the run stopped inside step {n + 1}: blocks {back[0]}..{back[-1]} go back to their copies from "
                     f"before it, and step {n + 1} is taken again")
        ahead = [j for j, st in enumerate(self.states) if st.version > n or st.perturbed >= n]
        if ahead:
            st = self.states[ahead[0]]
            raise ConfigError(f"the stream folder's block {ahead[0]} is at step {max(st.version, st.perturbed + 1)} "
                              f"but the run's log ends at step {n}: the folder was trained by another run; "
                              f"prepare a fresh folder for a new run")
        self.history = {r.step: r for r in records}

    # -- fetching, settling, releasing ---------------------------------------------------------------

    def _dtypes(self, j: int) -> dict[str, torch.dtype]:
        """Block j's tensors on the device: trained ones float32 (masters), other floats in the compute
        dtype, quantized values (integers) as they are stored."""
        trained = {n for _, n in self._trainable[j]}
        return {n: (torch.float32 if n in trained else self.precision.compute if p.is_floating_point() else p.dtype)
                for n, p in self.params[j].items()}

    def _submit_fetch(self, j: int) -> None:
        if 0 <= j < len(self.layers) and j not in self._fetches and j not in self._resident:
            def fetch(j=j):  # in the worker: the block and its optimizer state, copied on the side stream
                host, buffers = self.tier.read(j, self._pool)
                if self._state_on_disk and self._trainable[j]:
                    opt_state = {n: s for n, s in self.tier.read_opt_state(j).items()}
                else:  # held in host memory while the block was away (its write-back came first: one worker)
                    opt_state = {n: self._host_state.pop(i) for i, n in self._trainable[j] if i in self._host_state}
                flat = _flat_state(opt_state)
                tensors, event = self._transfers.to_device(
                    {**host, **flat}, {**self._dtypes(j), **{k: v.dtype for k, v in flat.items()}})
                opt_state = _unflat_state(opt_state, tensors)
                tensors = {n: tensors[n] for n in host}
                if event is not None:  # the host buffer is free once the copy is done
                    event.synchronize()
                    return tensors, event, [], buffers, opt_state
                return tensors, None, buffers, [], opt_state
            self._fetches[j] = self._worker.submit(fetch)

    def _arrive(self, j: int) -> _Resident:
        """Block j on the device, up to date, bound to the model; the next ones fetched meanwhile."""
        if j in self._resident:
            return self._resident[j]
        self._submit_fetch(j)
        tensors, event, keep, pooled, opt_state = self._fetches.pop(j).result()
        for buf in pooled:
            self._pool.give(buf)
        self._transfers.wait(event, {**tensors, **_flat_state(opt_state)})
        res = _Resident(tensors, keep)
        self._resident[j] = res
        if self._opt is not None:  # the block's optimizer state comes with it
            for i, n in self._trainable[j]:
                if i in self._host_state:  # handed over before streaming (disk tier): the tier must receive it
                    self._opt.tensor_state[i] = _moved(self._host_state.pop(i), self.device)
                    res.changed = res.changed or self._state_on_disk
                elif n in opt_state:
                    self._opt.tensor_state[i] = opt_state[n]
        self._settle(j, res)
        self._bind(j)
        for ahead in range(1, self.prefetch + 1):
            self._submit_fetch(j + ahead)
        return res

    def _pairs(self, j: int) -> list[tuple[int, torch.Tensor]]:
        res = self._resident[j]
        return [(i, res.tensors[n]) for i, n in self._trainable[j]]

    def _settle(self, j: int, res: _Resident) -> None:
        """Apply what block j still owes: the pending update of its last step, or steps it missed."""
        state, opt = self.states[j], self._opt
        if opt is None or not self._trainable[j]:
            return
        pairs = self._pairs(j)
        if state.perturbed >= 0:
            record = self.history.get(state.perturbed)
            if record is not None:  # the common case: the fused restore + update of the previous step
                opt.update(pairs, record)
                state = BlockState(state.perturbed + 1)
            else:  # that step never finished (a non-finite loss, Ctrl-C, a crash): take its moves back
                opt.undo(pairs, StepKey(state.perturbed, state.seed), opt.offsets())
                state = BlockState(state.version)
            res.changed = True
        while state.version < self.version:  # a block behind the log (after a resume): catch up exactly
            record = self.history.get(state.version)
            if record is None:
                raise ConfigError(f"block {j} of the stream folder is at step {state.version} but the run log has no "
                                  f"record of step {state.version + 1}; the folder belongs to another run")
            opt.replay(record, pairs)
            state = BlockState(state.version + 1)
            res.changed = True
        self.states[j] = state

    def _bind(self, j: int) -> None:
        res, compute = self._resident[j], self.precision.compute
        for n, p in self.params[j].items():
            t = res.tensors[n]
            p.data = t if t.dtype == compute or not t.is_floating_point() else t.to(compute)

    def _rebind_trained(self, j: int) -> None:
        """After a move: a 16-bit compute copy must follow its float32 master."""
        if self.precision.compute != torch.float32:
            res = self._resident[j]
            for _, n in self._trainable[j]:
                self.params[j][n].data = res.tensors[n].to(self.precision.compute)

    def _leave(self, j: int) -> None:
        """Unbind block j; write back in the background what changed; give its buffers back."""
        res = self._resident.pop(j)
        for p in self.params[j].values():
            p.data = _hollow(p)
        # The optimizer state leaves with the block: to the tier with the weights (disk, when they
        # changed), or to host memory (RAM tier), copied in the background like the weights.
        opt_state = {} if self._opt is None else \
            {n: self._opt.tensor_state.pop(i) for i, n in self._trainable[j] if i in self._opt.tensor_state}
        state = self.states[j]
        changed = {n: res.tensors[n] for _, n in self._trainable[j]} if res.changed else {}
        after = self._transfers.mark_compute() if changed or opt_state else None
        into = self.tier.host_storage(j) if changed else {}

        def write_back(j=j, state=state):
            host_state = _unflat_state(opt_state, self._transfers.to_host(_flat_state(opt_state), after)) \
                if opt_state else {}
            if changed:
                self.tier.write(j, self._transfers.to_host(changed, after, into), state,
                                host_state if self._state_on_disk else None)
            if not self._state_on_disk:
                index = dict((n, i) for i, n in self._trainable[j])
                for n, entries in host_state.items():
                    self._host_state[index[n]] = entries
            for buf in res.host:
                self._pool.give(buf)
        self._writes = [f for f in self._writes if not f.done()]
        self._writes.append(self._worker.submit(write_back))

    def _state_away(self, j: int, opt) -> None:
        """Block j's optimizer state to host memory (the tier of the blocks) while the block is away."""
        for i, _ in self._trainable[j]:
            if i in opt.tensor_state:
                self._host_state[i] = _moved(opt.tensor_state.pop(i), torch.device("cpu"))

    def wait(self) -> None:
        """Block until every write-back has reached the tier and every fetch has landed
        (raises the first transfer error)."""
        for fut in [*self._writes, *self._fetches.values()]:
            fut.result()
        self._writes = []

    # -- hooks ------------------------------------------------------------------------------------

    def _enter(self, j: int):
        lockstep = getattr(self._probe, "lockstep", None)
        if lockstep is not None:
            lockstep.arrive(self._probe.r, j)
        elif j not in self._resident:
            self._arrive(j)
        return None

    def _exit(self, j: int, last: bool):
        lockstep = getattr(self._probe, "lockstep", None)
        if lockstep is not None:
            if last:
                lockstep.arrive(self._probe.r, "tail")
        elif self._step is None:
            self._leave(j)
            if last:
                self._submit_fetch(0)  # the next forward starts with block 0
        return None

    # -- the ZO step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, opt, closure: Callable[[], torch.Tensor], share: float = 1.0) -> torch.Tensor:
        """One ZO step of `opt` with every block visited once; returns the mean probe loss.

        `share`: with data parallelism, this rank's share of the batch rows (see `Group.rows`)."""
        self.attach(opt)
        for j in list(self._resident):
            self._leave(j)
        key = opt.begin()
        step = key.step
        n_probes, ends_on_probe = opt.n_probes, list(opt.moves())[-1][2]
        owned = [r for r in range(n_probes) if opt.runs_probe(r, share)]  # with perturbation parallelism, a share
        outside = self.outside
        masters = [p.data for _, p in outside]
        offsets: dict[int, float] = {}
        # Trainable tensors outside the blocks move once per step; each probe keeps its own copy.
        views: list[list[torch.Tensor]] = []
        rounded: list[dict[int, torch.Tensor]] = []  # a 16-bit model tensor reads its master's rounding
        for r in opt.walk(outside, key, offsets):  # the last probe can use the tensors themselves if no move follows it
            views.append(masters if r == n_probes - 1 and ends_on_probe else [m.clone() for m in masters])
            rounded.append({i: v.to(self._compute[i].dtype) for (i, _), v in zip(outside, views[-1]) if i in self._compute})

        def show(r: int) -> None:  # (at every block: made once a probe above)
            for (i, p), v in zip(outside, views[r]):
                if i in rounded[r]:
                    self._compute[i].data = rounded[r][i]
                else:
                    p.data = v

        lockstep = _Lockstep(self, closure, owned)
        self._step = lockstep
        block_offsets: dict[int, float] = {}
        j = -1
        try:
            for r in owned:
                show(r)
                lockstep.run(r, expect=0 if len(self.layers) else "tail")
            for j in range(len(self.layers)):
                self._arrive(j)
                pairs, block_offsets = self._pairs(j), {}
                for r in opt.walk(pairs, key, block_offsets):
                    if pairs:
                        self._rebind_trained(j)
                    if r in owned:
                        show(r)
                        lockstep.run(r, expect=j + 1 if j + 1 < len(self.layers) else "tail")
                if pairs:
                    self._resident[j].changed = True
                    self.states[j] = BlockState(self.states[j].version, step, key.seed)
                self._leave(j)
                j = -1
            self._submit_fetch(0)  # the next step (or evaluation) starts with block 0
            mine = {}
            for r in owned:
                show(r)
                mine[r] = float(lockstep.run(r, expect="done"))
                opt.check_finite(list(mine.values()))
            losses = opt.gather(mine, n_probes, share)
        except BaseException:
            lockstep.abort()
            self._abandon(opt, key, j, block_offsets)
            for (_, p), m in zip(outside, masters):
                p.data = m
            opt.undo(outside, key, offsets)
            self.sync_outside()
            raise
        finally:
            self._step = None
        for (_, p), m in zip(outside, masters):
            p.data = m
        record = opt.finish(key, losses)
        self.history = {step: record}
        opt.update(outside, record)
        self.sync_outside()
        self.version = opt.steps
        return torch.tensor(sum(losses) / len(losses))

    def sync_outside(self) -> None:
        """16-bit model tensors outside the blocks: rounded from their float32 masters (after a step or a
        restore that moved the masters)."""
        for i, master in self.outside:
            if i in self._compute:
                self._compute[i].data = master.detach().to(self._compute[i].dtype)

    def _abandon(self, opt, key: StepKey, j: int, offsets: dict[int, float]) -> None:
        """After a failed step: blocks end as they were before it.

        On disk each block still has its copy from before the step in its other slot: going back
        is exact. In host memory the moves are taken back (equal up to float rounding), the block
        in hand now and the others when they next arrive, as in the whole-model step.
        """
        in_hand = j if j >= 0 and j in self._resident else None
        if hasattr(self.tier, "go_back"):
            self.wait()
            if in_hand is not None:  # never written: drop it, the tier holds it as it was
                res = self._resident.pop(in_hand)
                for p in self.params[in_hand].values():
                    p.data = _hollow(p)
                if self._state_on_disk:  # and its optimizer state: the tier's copy is the current one
                    for i, _ in self._trainable[in_hand]:
                        opt.tensor_state.pop(i, None)
                for buf in res.host:
                    self._pool.give(buf)
            for b, state in enumerate(self.states):
                if state.perturbed == key.step:
                    self.tier.go_back(b)
                if b == in_hand or state.perturbed == key.step:
                    self.states[b] = self.tier.get_state(b)
        elif in_hand is not None:
            opt.undo(self._pairs(in_hand), key, offsets)
            self._rebind_trained(in_hand)
            self._leave(in_hand)

    def flush(self) -> None:
        """Bring every block up to date on the tier: before a checkpoint, an export, the end."""
        for j in range(len(self.layers)):
            state = self.states[j]
            if j in self._resident or state.perturbed >= 0 or (self._trainable[j] and state.version < self.version):
                self._arrive(j)
                self._leave(j)
        self.wait()

    def trained_values(self) -> list[torch.Tensor]:
        """Every trainable tensor's current value, in the optimizer's order (flushes first)."""
        self.flush()
        out: dict[int, torch.Tensor] = {i: p.data for i, p in self.outside}
        for j, trained in enumerate(self._trainable):
            if trained:
                values, _ = self.tier.read(j)
                for i, n in trained:
                    out[i] = values[n].clone() if isinstance(self.tier, DiskTier) else values[n]
        return [out[i] for i in sorted(out)]

    def close(self) -> None:
        """Flush, stop the worker and remove the hooks (the blocks stay on the tier)."""
        try:
            self.flush()
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._worker.close()
            if isinstance(self.tier, DiskTier):
                self.tier.close()


def _callers_context(device: torch.device, accel: Accelerator | None) -> Callable[[], contextlib.ExitStack]:
    """What a new thread does not inherit from the one that calls this: its autocast state, and on
    an accelerator its current stream (hence device). Returns a function that enters them."""
    autocast = [(kind, torch.get_autocast_dtype(kind)) for kind in dict.fromkeys(("cpu", device.type))
                if torch.is_autocast_enabled(kind)]
    stream = accel.current_stream() if accel is not None else None

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if stream is not None:
            stack.enter_context(accel.using(stream))
        for kind, dtype in autocast:
            stack.enter_context(torch.autocast(kind, dtype=dtype))
        return stack
    return enter


class _Lockstep:
    """The probe forwards of one step, each in its own thread, advanced one block at a time.

    Exactly one thread runs at any moment (the engine's, or one probe's), so the weights are never
    read while they move. A probe thread stops at every block entry and after the last block and
    waits for its turn; `run(r, expect)` lets probe r go and returns where it stopped next.
    """

    def __init__(self, engine: StreamEngine, closure: Callable, probes: list[int]):
        self.engine, self.closure = engine, closure
        self._go = {r: threading.Semaphore(0) for r in probes}
        self._arrived: queue.Queue = queue.Queue()
        self._aborting = False
        self._threads = {r: threading.Thread(target=self._main, args=(r,), daemon=True, name=f"zotune-probe-{r}")
                         for r in probes}
        self._started = dict.fromkeys(probes, False)
        self._finished = dict.fromkeys(probes, False)
        self._callers = _callers_context(engine.device, engine._transfers.accel)

    def _main(self, r: int) -> None:
        self.engine._probe.lockstep, self.engine._probe.r = self, r
        self._go[r].acquire()
        try:
            if self._aborting:
                raise _Abort
            with self._callers(), torch.inference_mode():
                loss = self.closure()
            self._arrived.put((r, "done", float(loss)))
        except _Abort:
            self._arrived.put((r, "aborted", None))
        except BaseException as e:  # noqa: BLE001 -- raised again in the engine's thread
            self._arrived.put((r, "error", e))

    def arrive(self, r: int, where) -> None:
        """Called in probe r's thread at a stop; returns when it is probe r's turn again."""
        self._arrived.put((r, where, None))
        self._go[r].acquire()
        if self._aborting:
            raise _Abort

    def run(self, r: int, expect):
        if not self._started[r]:
            self._started[r] = True
            self._threads[r].start()
        self._go[r].release()
        while True:
            try:
                who, where, value = self._arrived.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
                break
            except queue.Empty:
                continue
        if where == "error":
            self._finished[r] = True
            raise value
        if where in ("done", "aborted"):
            self._finished[r] = True
        if who != r or where != expect:
            got = f"block {where}" if isinstance(where, int) else where
            want = f"block {expect}" if isinstance(expect, int) else expect
            raise ConfigError(f"streaming: probe {r} reached {got} where {want} was expected; the closure must run "
                              f"the model's forward exactly once, through every block in order")
        return value

    def abort(self) -> None:
        """Stop every probe thread still inside the model (each raises at its next stop) and join them."""
        self._aborting = True
        for r in self._threads:
            if self._started[r] and not self._finished[r]:
                self._go[r].release()
        for r, t in self._threads.items():
            if self._started[r]:
                t.join()


def stream_(model: nn.Module, cfg: StreamConfig, device: torch.device | str = "cpu", blocks_path: str | None = None,
            at_step: int = 0, log=print, accelerator: Accelerator | None = None) -> StreamEngine:
    """Move `model`'s transformer blocks to the tier of `cfg`, in place; returns the engine.

    Everything outside the blocks goes to `device`; the blocks never do (load the model on the CPU:
    only stand-ins of one element are made on the device). With the disk tier, `cfg.dir` is written
    from the model's current weights, one block at a time (an existing stream folder is refused: load
    it with `load_streamed` instead). `at_step`: how many steps the optimizer has taken on these weights.
    `accelerator`: the stream and copy calls to use (default: those of `device`; tests pass a fake).
    """
    from zotune.stream.folder import write_folder

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
        pin = accelerator is not None and accelerator.pins
        blocks = []
        for block in layers:
            stored = {}
            for n, p in block.named_parameters():  # quantized values (integers) keep their dtype
                stored[n] = _host_copy(p.data, storage if p.is_floating_point() else p.dtype, pin)
                p.data = _hollow(p, device)
            blocks.append(stored)
        tier = RamTier(blocks, pin)
        tier.states = [BlockState(at_step) for _ in blocks]
    else:
        write_folder(model, cfg.dir, storage, blocks_path, at_step, log=log)
        tier = DiskTier(cfg.dir)
        for block in layers:
            for p in block.parameters():
                p.data = _hollow(p, device)
    log(f"streaming {len(layers)} blocks from {'host memory' if cfg.tier == 'cpu' else cfg.dir}: {precision.reason}")
    return StreamEngine(model, tier, layers, device, precision, cfg.prefetch, log, accelerator)


def _host_copy(t: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """`t` in host memory as `dtype` (page-locked with `pin`): `t` itself when it already is, else one copy."""
    if t.device.type == "cpu" and t.dtype == dtype and (t.is_pinned() or not pin):
        return t
    out = torch.empty(t.shape, dtype=dtype, pin_memory=pin)
    out.copy_(t)
    return out


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
