"""The GPU-specific logic of streaming, made observable on the CPU: a fake accelerator whose copies
land only when waited for, where the whole model is placed, and what probe threads inherit."""

import pytest
import torch
from torch import nn

from conftest import tiny_model
from fake_accelerator import FakeAccelerator
from test_stream import assert_same, closure_for, run
from test_stream_runs import train_args
from zotune.cli import main
from zotune.methods import NonFiniteLossError, make_optimizer
from zotune.models import ConfigError, find_block_list
from zotune.stream import StreamConfig, stream_

quiet = dict(log=lambda *a: None)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("method", [dict(), dict(name="zoadam"), dict(n_directions=2)])
def test_streamed_equals_resident_through_a_fake_accelerator(tier, method, tmp_path):
    accel = FakeAccelerator()
    folder = tmp_path / "b" if tier == "disk" else None
    resident = run("llama", trainable="last-blocks:2+final-norm", **method)
    streamed = run("llama", tier=tier, folder=folder, trainable="last-blocks:2+final-norm", accelerator=accel, **method)
    assert accel.copies > 0  # every block and its state went through the fake's streams
    assert_same(resident, streamed)


def test_the_fake_accelerator_catches_a_missing_wait():
    """The same run where no wait is honoured: the copies never land, the blocks hold NaN."""
    with pytest.raises(NonFiniteLossError):
        run("llama", steps=1, tier="cpu", accelerator=FakeAccelerator(forget_waits=True))


def _block_bytes(module) -> int:
    """Bytes of real storage (more than the one element of a stand-in) held by `module`'s blocks."""
    try:
        _, layers = find_block_list(module)
    except (ConfigError, AttributeError):
        return 0
    return _real_bytes(layers.parameters())


def _real_bytes(params) -> int:
    storages = {}
    for p in params:
        s = p.untyped_storage()
        if s.nbytes() > p.element_size():
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


@pytest.fixture
def placements(monkeypatch):
    """Records the block bytes of every `Module.to(device)` and, at every block entry of a streamed
    model, the real storage its parameters hold (as bytes, with the blocks' sizes)."""
    seen = {"moved": [], "held": []}
    to = nn.Module.to

    def spy_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            seen["moved"].append(_block_bytes(self))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy_to)
    from zotune.stream import engine as engine_module

    init = engine_module.StreamEngine.__init__

    def watch(self, model, tier, layers, *a, **k):
        init(self, model, tier, layers, *a, **k)
        def held(module, args):
            seen["held"].append(_real_bytes(model.parameters()))
        for block in layers:
            block.register_forward_pre_hook(held)  # after the engine's own: the block is in place
        seen["engine"] = self
    monkeypatch.setattr(engine_module.StreamEngine, "__init__", watch)
    return seen


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_with_a_tier_the_blocks_never_go_to_the_device_whole(tier, placements, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    extra = ["--offload", tier] + (["--offload-dir", str(tmp_path / "blocks")] if tier == "disk" else [])
    assert main(train_args(tiny_model_dir, data_file, out, 3, *extra)) == 0
    assert main(["resume", str(out), "run.steps=4"]) == 0
    assert main(["eval", "--model", str(out), "--device", "cpu", "--split", "dev"]) == 0
    assert max(placements["moved"], default=0) == 0, "a whole model went to the compute device"
    engine = placements["engine"]
    block = max(_real_bytes(layer.parameters()) for layer in [tiny_model("llama").model.layers[0]])
    outside = _real_bytes(p for _, p in tiny_model("llama").named_parameters() if ".layers." not in _)
    assert placements["held"], "no block was entered"
    assert max(placements["held"]) <= outside + (engine.prefetch + 2) * block


def test_the_placement_check_sees_a_resident_model_go_to_the_device(placements, tiny_model_dir, data_file, tmp_path):
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "run", 1)) == 0
    assert max(placements["moved"]) > 0


def test_a_stand_in_is_made_on_the_device_without_copying_the_tensor(monkeypatch):
    """stream_ of a CPU model: each block tensor becomes a one-element stand-in; none is copied whole."""
    model = tiny_model("llama")
    copied = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out is not self and self.numel() > 1 and self.untyped_storage().nbytes() > self.element_size():
            copied.append(tuple(self.shape))
        return out

    layers = find_block_list(model)[1]
    block_shapes = {tuple(p.shape) for p in layers.parameters()}
    monkeypatch.setattr(torch.Tensor, "to", spy)
    engine = stream_(model, StreamConfig(tier="cpu"), "cpu", accelerator=FakeAccelerator(), **quiet)
    monkeypatch.undo()
    assert not [s for s in copied if s in block_shapes]
    assert all(p.untyped_storage().nbytes() == p.element_size() for p in layers.parameters())
    engine.close()


def test_probe_threads_run_under_the_callers_autocast():
    model = tiny_model("llama")
    opt = make_optimizer("zosgd", list(model.parameters()), lr=1e-3, eps=1e-3, seed=1)
    engine = stream_(model, StreamConfig(tier="cpu"), "cpu", **quiet)
    seen = []
    inner = closure_for(model, 0)

    def closure():
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return inner()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.step(opt, closure)
    engine.close()
    assert seen == [(True, torch.bfloat16)] * 2


def test_probe_threads_run_on_the_callers_stream():
    accel = FakeAccelerator()
    model = tiny_model("llama")
    opt = make_optimizer("zosgd", list(model.parameters()), lr=1e-3, eps=1e-3, seed=1)
    engine = stream_(model, StreamConfig(tier="cpu"), "cpu", accelerator=accel, **quiet)
    mine, seen, inner = accel.new_stream(), [], closure_for(model, 0)

    def closure():
        seen.append(accel.current_stream())
        return inner()

    with accel.using(mine):
        engine.step(opt, closure)
    engine.close()
    assert seen == [mine, mine]
