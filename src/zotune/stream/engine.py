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
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.methods import StepKey, require_walk
from zotune.precision import Precision
from zotune.stream import recovery
from zotune.stream.carry import Carry, flat_state, unflat_state
from zotune.stream.lockstep import Lockstep
from zotune.stream.outside import END, MIDDLE, START, Outside
from zotune.stream.tier import BlockState, Tier
from zotune.stream.transfers import Accelerator, Pool, Transfers, Worker, hollow


def refuse_unstreamable(method: type) -> None:
    """Raise, with the method's own reason, when the optimizer class `method` cannot be streamed."""
    require_walk(method, "streamed", "stream any other method, or train it resident")


@dataclass
class _Resident:
    """A block on the compute device: its tensors by name (float32 masters for trained ones)."""

    tensors: dict[str, torch.Tensor]
    host: list[torch.Tensor]  # pool buffers to give back after the write-back
    changed: bool = False


class StreamEngine:
    """Streams a model's blocks; see the module docstring. Made by `stream_`, undone by `unstream_`."""

    def __init__(self, model: nn.Module, tier: Tier, layers: nn.ModuleList, device: torch.device,
                 precision: Precision, prefetch: int = 1, log=print, accelerator: Accelerator | None = None):
        self.model, self.tier, self.layers, self.device = model, tier, layers, torch.device(device)
        self.precision, self.prefetch, self.log = precision, prefetch, log
        self.params: list[dict[str, nn.Parameter]] = [dict(b.named_parameters()) for b in layers]
        self.states = [tier.get_state(j) for j in range(len(layers))]
        self.version = 0  # steps completed: a settled block has had this many updates
        self.history: dict[int, object] = {}  # step index -> StepRecord, for blocks still to settle
        self._opt = None
        self._trainable: list[list[tuple[int, str]]] = [[] for _ in layers]  # per block: (index i, name)
        self._carry = Carry(tier, self._trainable)  # the optimizer state of blocks that are away
        self._outside = Outside(model, layers)  # trained tensors that stay on the device (or their masters)
        self._resident: dict[int, _Resident] = {}
        self._fetches: dict[int, Future] = {}
        self._writes: dict[int, Future] = {}  # block -> its last write-back, until a fetch of it has waited
        self._transfers = Transfers(self.device, accelerator)
        self._pool = Pool(pin=self._transfers.accel is not None and self._transfers.accel.pins)
        # Fetches and write-backs on their own workers (and streams), so a transfer-bound step moves data
        # both ways at once. The fetch of block j waits for j's write-back: both use its host storage.
        self._worker = Worker(depth=2 * prefetch + 2)
        self._writer = Worker(depth=2 * prefetch + 2, name="zotune-writeback")
        self.device_blocks = prefetch + 2  # the most blocks on the device at once (`StreamConfig.device_blocks`)
        self._probe = threading.local()  # .lockstep and .r in a probe thread
        self._step: Lockstep | None = None
        self._held: set[int] = set()  # blocks kept on the device after their forward (`holding`)
        self._hooks = []
        last = len(layers) - 1
        for j, block in enumerate(layers):
            self._hooks.append(block.register_forward_pre_hook(lambda m, a, j=j: self._enter(j, j == 0)))
            self._hooks.append(block.register_forward_hook(lambda m, a, o, j=j: self._exit(j, j == last)))

    # -- the optimizer ----------------------------------------------------------------------------

    def attach(self, opt, masters: dict[int, torch.Tensor] | None = None) -> None:
        """Use `opt`'s trainable tensors and tensor indices (its direction seeds).

        `masters`: float32 values of trained tensors by tensor index, to start their masters from instead
        of the model's 16-bit values (a RAM-tier run restored from its snapshot and log)."""
        if self._opt is opt:
            return
        if self._opt is not None:
            raise ConfigError("this streamed model already trains with another optimizer; make one engine per "
                              "optimizer")
        refuse_unstreamable(type(opt))
        index = {id(p): i for i, p in opt.indexed()}
        in_blocks = set()
        for j, named in enumerate(self.params):
            self._trainable[j] = [(index[id(p)], n) for n, p in named.items() if id(p) in index]
            in_blocks |= {id(p) for p in named.values()}
            if self._trainable[j]:
                self.tier.add_masters(j, [n for _, n in self._trainable[j]])
                for i, n in self._trainable[j] if masters else ():
                    if i in masters:
                        self.tier.set_master(j, n, masters[i])
        self.tier.sync_ranks()
        self._outside.attach(opt, in_blocks, masters)
        self._carry.start(opt, self._resident)  # state the optimizer holds already (a resumed run)
        self.version = opt.steps
        self._opt = opt
        for j in list(self._fetches):  # fetched before the optimizer was known: without its state, fetch again
            _, _, keep, pooled, _ = self._fetches.pop(j).result()
            for buf in [*keep, *pooled]:
                self._pool.give(buf)

    def join(self, group) -> None:
        """Serve the ranks of a process group (collective; nothing to do for one process): on the disk
        tier one rank writes the folder and each reads its slice of every block (`DiskTier.join`)."""
        if group.world > 1:
            self.tier.join(group)

    def restore(self, records: list) -> None:
        """Check the tier against a run's log and keep its records, so every block can catch up
        (`recovery.restore`)."""
        recovery.restore(self, records)

    # -- fetching, settling, releasing ---------------------------------------------------------------

    def _dtypes(self, j: int) -> dict[str, torch.dtype]:
        """Block j's tensors on the device: trained ones float32 (masters), other floats in the compute
        dtype, quantized values (integers) as they are stored."""
        trained = {n for _, n in self._trainable[j]}
        return {n: (torch.float32 if n in trained else self.precision.compute if p.is_floating_point() else p.dtype)
                for n, p in self.params[j].items()}

    def _submit_fetch(self, j: int) -> None:
        if 0 <= j < len(self.layers) and j not in self._fetches and j not in self._resident:
            written = self._writes.pop(j, None)
            # Over the device's share of blocks, the oldest write-backs leave before this fetch lands.
            writing = [f for f in self._writes.values() if not f.done()]
            over = len(self._resident) + len(self._fetches) + 1 + len(writing) - self.device_blocks
            freeing = writing[:max(0, over)]

            def fetch(j=j):  # in the worker: the block and its optimizer state, copied on the side stream
                if written is not None:  # j's last write-back into the same host storage (or disk slot) first
                    written.result()
                host, buffers = self.tier.read(j, self._pool)
                for f in freeing:
                    f.result()
                opt_state = self._carry.fetch(j)
                flat = flat_state(opt_state)
                tensors, event = self._transfers.to_device(
                    {**host, **flat}, {**self._dtypes(j), **{k: v.dtype for k, v in flat.items()}})
                opt_state = unflat_state(opt_state, tensors)
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
        self._transfers.wait(event, {**tensors, **flat_state(opt_state)})
        res = _Resident(tensors, keep)
        self._resident[j] = res
        if self._opt is not None:  # the block's optimizer state comes with it
            res.changed = self._carry.arrive(j, self._opt, opt_state, self.device) or res.changed
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
                opt.undo(pairs, StepKey(state.perturbed, state.seed), opt.offsets(state.perturbed))
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
            p.data = hollow(p)
        # The optimizer state leaves with the block: to the tier with the weights (disk, when they
        # changed), or to host memory (RAM tier), copied in the background like the weights.
        opt_state = self._carry.leave(j, self._opt)
        state = self.states[j]
        changed = {n: res.tensors[n] for _, n in self._trainable[j]} if res.changed else {}
        after = self._transfers.mark_compute() if changed or opt_state else None
        into = self.tier.host_storage(j) if changed else {}

        def write_back(j=j, state=state):
            host_state = unflat_state(opt_state, self._transfers.to_host(flat_state(opt_state), after)) \
                if opt_state else {}
            on_tier = self._carry.stored(j, host_state)
            if changed:
                self.tier.write(j, self._transfers.to_host(changed, after, into), state, on_tier)
            changed.clear()  # the block's device tensors are free now, not when this job is dropped
            res.tensors.clear()
            for buf in res.host:
                self._pool.give(buf)
        self._writes[j] = self._writer.submit(write_back)

    def wait(self) -> None:
        """Block until every write-back has reached the tier and every fetch has landed
        (raises the first transfer error)."""
        for fut in [*self._writes.values(), *self._fetches.values()]:
            fut.result()
        self._writes = {}

    # -- hooks ------------------------------------------------------------------------------------

    @property
    def outside(self) -> list[tuple[int, torch.Tensor]]:
        """Trained tensors outside the blocks, on the device: (tensor index, the tensor or its float32 master)."""
        return self._outside.tensors

    def _enter(self, j: int, first: bool):
        if first:
            self._outside.at(MIDDLE)
        lockstep = getattr(self._probe, "lockstep", None)
        if lockstep is not None:
            lockstep.arrive(self._probe.r, j)
        elif j not in self._resident:
            self._arrive(j)
        return None

    def _exit(self, j: int, last: bool):
        if last:
            self._outside.at(END)
        lockstep = getattr(self._probe, "lockstep", None)
        if lockstep is not None:
            if last:
                lockstep.arrive(self._probe.r, "tail")
        elif self._step is None and j not in self._held:
            self._leave(j)
            if last:
                self._submit_fetch(0)  # the next forward starts with block 0
        return None

    @contextlib.contextmanager
    def holding(self, j: int):
        """Block j on the device, bound, for the duration (outside a step): its forwards do not send it
        away, so a backward reads the weights its forward saw (`zotune sensitivity` on a stream folder)."""
        self._arrive(j)
        self._held.add(j)
        try:
            yield
        finally:
            self._held.discard(j)
            self._leave(j)

    # -- the ZO step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, opt, closure: Callable[[], torch.Tensor], share: float = 1.0) -> torch.Tensor:
        """One ZO step of `opt` with every block visited once; returns the mean probe loss.

        `share`: with data parallelism, this rank's share of the batch rows (see `Group.rows`)."""
        self.attach(opt)
        for j in list(self._resident):
            self._leave(j)
        plan = opt.start_step(share)  # with perturbation parallelism, this rank runs a share of the probes
        key, owned = plan.key, plan.owned
        start, end, copied = self._outside.split()
        # Tensors outside the blocks used before block 0 only, or after the last block only, are walked in
        # place in that segment; the others move once per step and each probe keeps its own copy.
        masters = [p.data for _, p in copied]
        offsets: dict[str, dict[int, float]] = {START: {}, END: {}, "copied": {}}
        views: list[list[torch.Tensor]] = []
        rounded: list[dict[int, torch.Tensor]] = []  # a 16-bit model tensor reads its master's rounding
        compute = self._outside.compute
        for r in opt.walk(copied, key, offsets["copied"]):  # the last probe can use the tensors if no move follows
            views.append(masters if r == plan.n_probes - 1 and plan.ends_on_probe else [m.clone() for m in masters])
            rounded.append({i: v.to(compute[i].dtype) for (i, _), v in zip(copied, views[-1]) if i in compute})

        def show(r: int) -> None:  # (at every block: made once a probe above)
            for (i, p), v in zip(copied, views[r]):
                if i in rounded[r]:
                    compute[i].data = rounded[r][i]
                else:
                    p.data = v

        lockstep = Lockstep(closure, owned, self._probe, self.device, self._transfers.accel)
        self._step = lockstep
        block_offsets: dict[int, float] = {}
        j = -1
        try:
            for r in opt.walk(start, key, offsets[START]):
                if r in owned:
                    self._outside.refresh(start)
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
                    self.states[j] = BlockState(self.states[j].version, key.step, key.seed)
                self._leave(j)
                j = -1
            self._submit_fetch(0)  # the next step (or evaluation) starts with block 0
            mine = {}
            for r in opt.walk(end, key, offsets[END]):
                if r in owned:
                    self._outside.refresh(end)
                    show(r)
                    mine[r] = float(lockstep.run(r, expect="done"))
            record = opt.end_step(plan, mine, share)
        except BaseException:
            lockstep.abort()
            self._abandon(opt, key, j, block_offsets)
            for (_, p), m in zip(copied, masters):
                p.data = m
            for pairs, name in ((copied, "copied"), (start, START), (end, END)):
                opt.undo(pairs, key, offsets[name])
            self.sync_outside()
            raise
        finally:
            self._step = None
            self._outside.planned = {}
        for (_, p), m in zip(copied, masters):
            p.data = m
        self.history = {key.step: record}
        opt.update(self.outside, record)
        self.sync_outside()
        self.version = opt.steps
        return torch.tensor(sum(record.losses) / len(record.losses))

    def sync_outside(self) -> None:
        """16-bit model tensors outside the blocks: rounded from their float32 masters (after a step or a
        restore that moved the masters)."""
        self._outside.sync()

    def _abandon(self, opt, key: StepKey, j: int, offsets: dict[int, float]) -> None:
        """After a failed step: blocks end as they were before it (`recovery.abandon`)."""
        recovery.abandon(self, opt, key, j, offsets)

    def _drop(self, j: int) -> None:
        """Unbind block j without writing it back; give its buffers back."""
        res = self._resident.pop(j)
        for p in self.params[j].values():
            p.data = hollow(p)
        for buf in res.host:
            self._pool.give(buf)

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
                values = self.tier.values(j, [n for _, n in trained])
                for i, n in trained:
                    out[i] = values[n]
        return [out[i] for i in sorted(out)]

    def close(self) -> None:
        """Flush, stop the worker and remove the hooks (the blocks stay on the tier)."""
        try:
            self.flush()
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._outside.close()
            self._worker.close()
            self._writer.close()
            self.tier.close()
