"""A fake accelerator for the CPU: streams, events and asynchronous copies whose results land only
when waited for, so that a missing wait or a buffer reused too early makes streamed != resident.

It has `zotune.stream.engine.Accelerator`'s interface. Every copy is queued on the current stream
(per thread, as on CUDA) into a new tensor (or the given destination) pre-filled with NaN (floats)
or the complement of the source (integers, booleans); it runs, reading its source then, when an
event recorded after it is synchronized or waited for by another stream.
"""

from __future__ import annotations

import threading

import torch


class FakeEvent:
    def __init__(self, stream: FakeStream, upto: int):
        self.stream, self.upto = stream, upto

    def synchronize(self) -> None:
        if not self.stream.accel.forget_waits:
            self.stream.land(self.upto)

    def query(self) -> bool:
        return self.stream.landed >= self.upto


class FakeStream:
    def __init__(self, accel: FakeAccelerator, name: str):
        self.accel, self.name = accel, name
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (number, destination, source)
        self.issued = self.landed = 0
        self._lock = threading.Lock()

    def enqueue(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self._lock:
            self.issued += 1
            self._pending.append((self.issued, dst, src))

    def land(self, upto: int) -> None:
        with self._lock:
            while self._pending and self._pending[0][0] <= upto:
                _, dst, src = self._pending.pop(0)
                dst.copy_(src)
                self.landed += 1

    def record_event(self) -> FakeEvent:
        with self._lock:
            return FakeEvent(self, self.issued)

    def wait_event(self, event: FakeEvent) -> None:
        event.synchronize()  # work on this stream runs at once (the host computes): the copies land now

    def wait_stream(self, other: FakeStream) -> None:
        other.record_event().synchronize()


def _garbage_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(t.shape, float("nan"), dtype=dtype)
    if dtype == torch.bool:
        return (~t).clone()
    return (~t).to(dtype)


class FakeAccelerator:
    """`forget_waits=True` drops every wait and synchronize: the copies never land (a broken engine)."""

    pins = False

    def __init__(self, forget_waits: bool = False, pins: bool = False):
        self.forget_waits, self.pins = forget_waits, pins
        self.pinned_bytes, self.buffers, self.released = 0, 0, False  # what host_buffer handed out
        self.compute = FakeStream(self, "compute")
        self._local = threading.local()
        self.copies = 0

    def new_stream(self) -> FakeStream:
        return FakeStream(self, "side")

    def current_stream(self) -> FakeStream:
        return getattr(self._local, "stream", None) or self.compute

    def using(self, stream: FakeStream):
        accel = self

        class _Using:
            def __enter__(self):
                self.previous = getattr(accel._local, "stream", None)
                accel._local.stream = stream

            def __exit__(self, *exc):
                accel._local.stream = self.previous

        return _Using()

    def copy(self, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        out = _garbage_like(t, dtype)
        self.copies += 1
        self.current_stream().enqueue(out, t)
        return out

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copies += 1
        self.current_stream().enqueue(dst, src)

    def record_stream(self, t: torch.Tensor, stream: FakeStream) -> None:
        pass

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Plain host memory standing in for an exact page-locked buffer, counted."""
        self.pinned_bytes += nbytes
        self.buffers += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    def release_host_buffers(self) -> None:
        self.released = True
