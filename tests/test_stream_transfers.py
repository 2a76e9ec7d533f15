"""Fetches and write-backs on two workers and two side streams: both directions move at once, and the
fetch of a block never reads its host storage (or disk slot) before the block's write-back has landed."""

import threading
import time
import weakref

import pytest

from conftest import tiny_model
from fake_accelerator import FakeAccelerator
from test_stream import assert_same, closure_for, run
from zotune.methods import make_optimizer
from zotune.models import find_block_list, select_trainable
from zotune.stream import DiskTier, RamTier, StreamConfig, stream_
from zotune.stream.transfers import Transfers


@pytest.fixture
def slow_write_backs(monkeypatch):
    """Every write-back's copy to the host is late (it lands 30 ms after it is issued), and the tier's
    reads and writes are logged with the thread they ran in: ("read" | "write-start" | "write-end", block)."""
    log, lock = [], threading.Lock()
    to_host = Transfers.to_host

    def late_to_host(self, tensors, after, into=None):
        with lock:
            log.append(("copy-start", None, threading.current_thread().name))
        time.sleep(0.03)
        return to_host(self, tensors, after, into)

    monkeypatch.setattr(Transfers, "to_host", late_to_host)
    for tier in (RamTier, DiskTier):
        read, write = tier.read, tier.write

        def logged_read(self, j, pool=None, read=read):
            with lock:
                log.append(("read", j, threading.current_thread().name))
            return read(self, j, pool)

        def logged_write(self, j, tensors, state, opt_state=None, write=write):
            with lock:
                log.append(("write-start", j, threading.current_thread().name))
            write(self, j, tensors, state, opt_state)
            with lock:
                log.append(("write-end", j, threading.current_thread().name))

        monkeypatch.setattr(tier, "read", logged_read)
        monkeypatch.setattr(tier, "write", logged_write)
    return log


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("method", [dict(), dict(name="zoadam")])  # zoadam: its state travels with the block
def test_a_late_write_back_is_waited_for_by_the_fetch_of_its_block(tier, method, slow_write_backs, tmp_path):
    folder = tmp_path / "b" if tier == "disk" else None
    resident = run("llama", trainable="last-blocks:2+final-norm", **method)
    streamed = run("llama", tier=tier, folder=folder, trainable="last-blocks:2+final-norm",
                   accelerator=FakeAccelerator(), **method)
    assert_same(resident, streamed)
    writing: set[int] = set()
    for what, j, _ in slow_write_backs:
        if what == "write-start":
            writing.add(j)
        elif what == "write-end":
            writing.discard(j)
        elif what == "read":
            assert j not in writing, f"block {j} was read while its write-back was still being written"
    threads = {(what, name) for what, _, name in slow_write_backs}
    assert ("write-start", "zotune-writeback") in threads and ("read", "zotune-fetch") in threads


def test_fetches_run_while_a_write_back_is_in_flight(slow_write_backs):
    """The two directions overlap: with write-backs 30 ms late, other blocks are read meanwhile (on one
    worker, every read would wait for the write-backs queued before it)."""
    run("llama", tier="cpu", trainable="all", accelerator=FakeAccelerator())
    in_flight, overlapped = 0, 0  # write-backs between the start of their copy and the end of their write
    for what, _, _ in slow_write_backs:
        in_flight += {"copy-start": 1, "write-end": -1}.get(what, 0)
        overlapped += what == "read" and in_flight > 0
    assert overlapped > 0


class _CountingAccelerator(FakeAccelerator):
    """A fake accelerator that keeps a weak reference to every tensor fetched to the device (copied on the
    first side stream, the fetches'), to count the device memory that blocks hold."""

    def __init__(self):
        super().__init__()
        self.fetched, self._fetch_stream = [], None

    def new_stream(self):
        stream = super().new_stream()
        self._fetch_stream = self._fetch_stream or stream
        return stream

    def copy(self, t, device, dtype):
        out = super().copy(t, device, dtype)
        if self.current_stream() is self._fetch_stream:
            self.fetched.append(weakref.ref(out))
        return out

    def live_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (r() for r in self.fetched) if t is not None)


@pytest.mark.parametrize("device_blocks, most", [(2, 2), (0, 3)])
def test_device_blocks_bounds_the_blocks_on_the_device(device_blocks, most, slow_write_backs):
    """stream.device_blocks=2: a fetch waits for the write-back before it, so at most 2 blocks' tensors
    are alive on the device at any block entry (write-backs 30 ms late); by default (prefetch + 2) the
    block being written back is a third, while both directions move."""
    model = tiny_model("llama")
    params = [p for _, p in select_trainable(model, "all")]
    opt = make_optimizer("zosgd", params, seed=1, lr=1e-3, eps=1e-3)
    accel = _CountingAccelerator()
    engine = stream_(model, StreamConfig(tier="cpu", device_blocks=device_blocks), "cpu", accelerator=accel,
                     log=lambda *a: None)
    block = sum(p.numel() * 4 for p in find_block_list(tiny_model("llama"))[1][0].parameters())
    seen = []
    for layer in engine.layers:
        layer.register_forward_pre_hook(lambda m, a: seen.append(accel.live_bytes()))
    for t in range(3):
        engine.step(opt, closure_for(model, t))
    engine.close()
    assert max(seen) == most * block, (max(seen) / block, device_blocks)
