"""Host <-> device transfers for streamed blocks: torchao's CPU-offload shape, device-generic.

A side stream, events, asynchronous copies and `record_stream` through an `Accelerator` (the calls of
`torch.cuda`, `torch.xpu`, ...), in one place, so that tests can put a fake in its place whose copies
land only when waited for (`tests/fake_accelerator.py`); plain synchronous copies on the CPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch


def hollow(p: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A stand-in with p's shape and dtype and one element of storage (on `device`, default p's), for
    a block that is away: nothing of p is copied to build it."""
    return torch.zeros((), dtype=p.dtype, device=device or p.device).expand(p.shape)


class Worker:
    """One background thread running transfer jobs in order, with a bounded queue (back-pressure)."""

    def __init__(self, depth: int, name: str = "zotune-fetch"):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
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
            job = fn = fut = None  # what the job holds (a block's device tensors) is not kept until the next one

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
        self.registered: list[torch.Tensor] = []  # host buffers registered with the driver (host_buffer)
        self.pinned_bytes = 0

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

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of page-locked host memory, exactly. On CUDA, plain memory registered with the driver
        (`cudaHostRegister`): torch's caching host allocator would round each request up to a power of two
        (a 7B float32 tier would pin 32 GiB for 25.9 GB). Elsewhere, the device's own pinned allocator."""
        if self.device.type == "cuda" and nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0:
                self.registered.append(buf)
                self.pinned_bytes += nbytes
                return buf
        self.pinned_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def release_host_buffers(self) -> None:
        """Unregister what `host_buffer` registered (the tier is closed: its blocks are no longer copied)."""
        for buf in self.registered:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self.registered = []


def host_views(specs: list[tuple[str, torch.Size, torch.dtype]], accelerator) -> dict[str, torch.Tensor]:
    """One page-locked slab of exactly the bytes of `specs` (each tensor 64-byte aligned), from
    `accelerator.host_buffer`, as tensors that view it: one registration per block, none rounded up."""
    offsets, total = [], 0
    for _, shape, dtype in specs:
        offsets.append(total)
        total += -(-torch.Size(shape).numel() * dtype.itemsize // 64) * 64
    slab = accelerator.host_buffer(total)
    return {name: slab[o: o + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
            for (name, shape, dtype), o in zip(specs, offsets)}


class Transfers:
    """Host <-> device copies through an `Accelerator`, plain without one: fetches on one side stream,
    write-backs on another, so the two directions of the link are used at once."""

    def __init__(self, device: torch.device, accel: Accelerator | None = None):
        self.device = device
        self.accel = accel if accel is not None else Accelerator.for_device(device)
        self.stream = self.accel.new_stream() if self.accel is not None else None
        self.write_stream = self.accel.new_stream() if self.accel is not None else None

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
        self.write_stream.wait_event(after)
        out = {}
        with self.accel.using(self.write_stream):
            for n, t in tensors.items():
                self.accel.record_stream(t, self.write_stream)  # the allocator must not reuse t before the copy ends
                if n in into:
                    self.accel.copy_into(into[n], t)
                    out[n] = into[n]
                else:
                    out[n] = self.accel.copy(t, torch.device("cpu"), t.dtype)
            done = self.write_stream.record_event()
        done.synchronize()
        return out


class Pool:
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
