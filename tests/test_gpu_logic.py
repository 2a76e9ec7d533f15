"""The GPU-specific logic of streaming, made observable on the CPU: a fake accelerator whose copies
land only when waited for, where the whole model is placed, and what probe threads inherit."""

import os

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


@pytest.mark.parametrize("storage", [None, "bfloat16"])
def test_the_host_memory_tier_pins_exactly_its_bytes_in_one_buffer_a_block(storage):
    """Page-locked host memory through the accelerator: one buffer per block (and one per block for the
    float32 masters of 16-bit trained tensors), exactly the tensors' bytes (64-byte aligned), never a
    power-of-two rounding; the run equals resident; the buffers are released when the tier closes."""
    accel = FakeAccelerator(pins=True)
    resident = run("llama", trainable="last-blocks:2+final-norm", storage=storage)
    streamed = run("llama", tier="cpu", trainable="last-blocks:2+final-norm", storage=storage, accelerator=accel)
    assert_same(resident, streamed)
    model = tiny_model("llama")
    _, blocks = find_block_list(model)
    size = 2 if storage else 4
    stored = sum(-(-p.numel() * size // 64) * 64 for p in blocks.parameters())
    masters = sum(-(-p.numel() * 4 // 64) * 64 for p in blocks[-2:].parameters()) if storage else 0
    assert accel.pinned_bytes == stored + masters and accel.pinned_bytes < 1.01 * (stored + masters)
    assert accel.buffers == len(blocks) + (2 if storage else 0) and accel.released


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


class _FakeCuda:
    """torch.cuda as a machine with `count` GPUs would answer (for device resolution only)."""

    def __init__(self, count):
        self.count, self.current = count, None

    def is_available(self):
        return True

    def device_count(self):
        return self.count

    def set_device(self, device):
        self.current = device


@pytest.mark.parametrize("name, local, want", [("cuda", 0, "cuda:0"), ("cuda", 3, "cuda:3"), ("cuda:0", 2, "cuda:2"),
                                               ("cuda:4", 1, "cuda:5"), ("auto", 1, "cuda:1"), ("cpu", 3, "cpu")])
def test_under_torchrun_every_process_has_its_own_gpu(name, local, want, monkeypatch):
    from zotune.resolve import resolve_device

    monkeypatch.setattr(torch, "cuda", _FakeCuda(8))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_device(name) == torch.device(want)


def test_a_process_given_one_visible_gpu_uses_it_and_it_is_made_current(monkeypatch):
    """A scheduler that sets CUDA_VISIBLE_DEVICES per rank: each process sees one GPU, cuda:0, whatever its
    local rank; and the device is made current, so launches that take the current device (Triton) use it."""
    from zotune.resolve import resolve_device

    fake = _FakeCuda(1)
    monkeypatch.setattr(torch, "cuda", fake)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert resolve_device("cuda") == torch.device("cuda:0") and fake.current == 0
    fake = _FakeCuda(8)
    monkeypatch.setattr(torch, "cuda", fake)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert resolve_device("cuda:1") == torch.device("cuda:1") and fake.current == 1


def test_more_processes_than_gpus_is_refused_with_one_line(monkeypatch):
    from zotune.resolve import resolve_device

    monkeypatch.setattr(torch, "cuda", _FakeCuda(2))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError, match="local rank 2 would use cuda:2, but this machine has 2"):
        resolve_device("cuda")


def test_the_process_group_is_bound_to_this_process_gpu(monkeypatch):
    import torch.distributed as dist

    from zotune.parallel import Group, ParallelDims

    calls = {}
    fake = _FakeCuda(4)
    monkeypatch.setattr(torch, "cuda", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.update(barrier=kw))
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")  # (recorded, so that the test leaves it as it was)
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT")
    group = Group.from_env(ParallelDims(data=2), torch.device("cuda:1"))
    group.barrier()
    assert calls["backend"] == "nccl" and calls["device_id"] == torch.device("cuda:1")
    assert os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "1"  # a dead peer raises (the dead-rank line), not an abort
    assert fake.current == torch.device("cuda:1")
    assert calls["barrier"] == {"device_ids": [1]}


def test_a_device_without_streams_copies_plainly():
    from zotune.stream.engine import Accelerator

    assert Accelerator.for_device(torch.device("mps")) is None  # torch.mps has no Stream
    assert Accelerator.for_device(torch.device("cpu")) is None


@pytest.mark.parametrize("decay, then", [(1.0, 0.0), (0.999, -3e-4)])
def test_the_accelerator_sweep_gives_the_cpu_bits(decay, then, monkeypatch):
    """An accelerator draws Rademacher directions in larger chunks, eagerly: the same bits as the
    CPU's fused kernel and its eager path (run here on the CPU with the accelerator's chunk)."""
    from zotune.methods import perturb

    n = perturb.ACCELERATOR_CHUNK + 12_345  # more than one chunk, and a ragged end
    start = torch.randn(n, generator=torch.Generator().manual_seed(0))
    out = {}
    for path in ("fused", "eager", "accelerator"):
        d = perturb.Directions("rademacher", threads=1)
        d.fused = path == "fused"
        if path == "accelerator":
            monkeypatch.setattr(d, "chunk", lambda device: perturb.ACCELERATOR_CHUNK)
        p = start.clone()
        d.add(p, 1234, 1, 7, 1e-3, decay, then)
        out[path] = p
    assert torch.equal(out["fused"], out["eager"]) and torch.equal(out["eager"], out["accelerator"])
    z = perturb.Directions("rademacher").z(start[:1000], 1234, 1, 7)
    assert torch.equal(torch.sign(z), z) and z.abs().sum() == 1000  # really ±1


def test_a_run_records_the_device_of_its_directions(tiny_model_dir, data_file, tmp_path):
    import json

    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, 1)) == 0
    assert json.loads((out / "base.json").read_text())["device"] == "cpu"


@pytest.mark.parametrize("method, refused", [
    (["method.distribution=gaussian"], "drew its gaussian directions on cuda (NVIDIA H200)"),  # CUDA's generator
    (["method.distribution=rademacher"], None),  # counter-based: the same bits on every device
    (["--method", "lozo", "method.interval=2"], None),  # r = 2, ±1 factors: every scale·Z exact
    (["--method", "lozo", "method.rank=3"], "drew its lozo directions"),  # entries ±3: a fused multiply-add rounds
    (["--method", "lozo-m", "method.interval=2"], "drew its lozo-m directions"),  # N·Vᵀ is real-valued
    # real-valued state updated with addcmul_ / addcdiv_ / rsqrt (FMAs, approximate rsqrt on CUDA): claimed
    # device-dependent until a GPU run shows the same bits (benchmarks/gpu_check.py, the replay part)
    (["--method", "zoadam"], "drew its zoadam directions"),
    (["--method", "hizoo"], "drew its hizoo directions"),
    (["--method", "zosgd-momentum"], "drew its zosgd-momentum directions"),
])
def test_directions_drawn_on_another_device_are_refused_where_they_round_differently(method, refused, tiny_model_dir,
                                                                                      data_file, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, 2, *method)) == 0
    base = json.loads((out / "base.json").read_text())
    (out / "base.json").write_text(json.dumps({**base, "device": "cuda (NVIDIA H200)"}))
    code = main(["resume", str(out), "run.steps=3"])
    if refused:
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert refused in err and "run.device=cuda" in err
    else:
        assert code == 0


def test_tf32_is_set_on_cuda_only_through_the_matmul_precision_and_model_tf32_is_checked():
    from zotune.models import ModelConfig
    from zotune.precision import set_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert set_tf32(torch.device("cpu"), True) is None
        assert torch.get_float32_matmul_precision() == "highest"
        assert "TF32 tensor cores" in set_tf32(torch.device("cuda"), True)  # the setting exists without a GPU
        assert torch.get_float32_matmul_precision() == "high"
        assert "full float32" in set_tf32(torch.device("cuda"), False)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(ConfigError, match="model.tf32='yes' must be true or false"):
        ModelConfig(tf32="yes")


def test_a_16_bit_tensor_trained_outside_the_blocks_trains_a_float32_master():
    """A bfloat16 final norm, streamed: it trains a float32 master on the device and the model reads its
    rounding, exactly as a resident bf16 model with `Masters` does (losses, projected gradients, masters)."""
    from zotune.precision import Masters

    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    runs = []
    for streamed in (False, True):
        model = tiny_model("llama").to(torch.bfloat16)
        params = [model.model.norm.weight, *model.model.layers[2].parameters()]
        masters = None if streamed else Masters(params)
        opt = make_optimizer("zosgd", masters.values if masters else params, lr=1e-4, eps=1e-3, seed=1)
        engine = stream_(model, StreamConfig(tier="cpu"), "cpu", **quiet) if streamed else None
        if engine:
            engine.attach(opt)
            assert model.model.norm.weight.dtype == torch.bfloat16 and engine.outside[0][1].dtype == torch.float32
        losses = []
        for _ in range(3):
            closure = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
            if engine:
                losses.append(float(engine.step(opt, closure)))
            else:
                losses.append(float(opt.step(masters.probe(closure))))
                masters.sync()
            losses.append(tuple(opt.last.grads))
        values = [v.clone() for v in (engine.trained_values() if engine else masters.values)]
        norm = model.model.norm.weight.detach().clone()
        if engine:
            engine.close()
        runs.append((losses, values, norm))
    (a, va, na), (b, vb, nb) = runs
    assert a == b and all(torch.equal(p, q) for p, q in zip(va, vb)) and torch.equal(na, nb)
    assert torch.equal(nb, vb[0].bfloat16()) and not torch.equal(vb[0], vb[0].bfloat16().float())


def test_sensitivity_runs_on_the_device_resident_or_a_block_at_a_time(placements, tiny_model_dir, data_file, tmp_path):
    """`zotune sensitivity` on run.device: a resident model goes there whole; a stream folder's blocks
    never do (each is held there for its backward alone); the mask records the device."""
    from zotune.sparse_delta import load_mask

    common = ["--data", str(data_file), "--rows", "8", "--batch-size", "4", "run.device=cpu",
              "task.verbalizer={pos: great, neg: terrible}", "task.n_dev=4", "task.n_test=4"]
    assert main(["sensitivity", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a.safetensors"), *common]) == 0
    assert max(placements["moved"]) > 0 and load_mask(tmp_path / "a.safetensors")[1]["device"] == "cpu"
    folder = tmp_path / "stream"
    assert main(["stream", "prepare", "--model", str(tiny_model_dir), "--out", str(folder)]) == 0
    placements["moved"].clear()
    assert main(["sensitivity", "--model", str(folder), "--out", str(tmp_path / "b.safetensors"), *common]) == 0
    assert max(placements["moved"], default=0) == 0, "a whole model went to the compute device"
    block = _real_bytes(tiny_model("llama").model.layers[0].parameters())
    outside = _real_bytes(p for n, p in tiny_model("llama").named_parameters() if ".layers." not in n)
    assert placements["held"] and max(placements["held"]) <= outside + (placements["engine"].prefetch + 2) * block
