"""The probe forwards of one streamed step, each in its own thread, advanced one block at a time."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

import torch

from zotune.config import ConfigError
from zotune.stream.transfers import Accelerator


class _Abort(BaseException):
    """Raised in a probe thread at a block entry when the step is being abandoned."""


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


class Lockstep:
    """The probe forwards of one step, each in its own thread, advanced one block at a time.

    Exactly one thread runs at any moment (the engine's, or one probe's), so the weights are never
    read while they move. A probe thread stops at every block entry and after the last block and
    waits for its turn; `run(r, expect)` lets probe r go and returns where it stopped next.
    """

    def __init__(self, closure: Callable, probes: list[int], where: threading.local, device: torch.device,
                 accel: Accelerator | None):
        self.closure, self.where = closure, where  # `where.lockstep`, `where.r`: set in each probe thread
        self._go = {r: threading.Semaphore(0) for r in probes}
        self._arrived: queue.Queue = queue.Queue()
        self._aborting = False
        self._threads = {r: threading.Thread(target=self._main, args=(r,), daemon=True, name=f"zotune-probe-{r}")
                         for r in probes}
        self._started = dict.fromkeys(probes, False)
        self._finished = dict.fromkeys(probes, False)
        self._callers = _callers_context(device, accel)

    def _main(self, r: int) -> None:
        self.where.lockstep, self.where.r = self, r
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
