"""`zotune bench gpu` (or `benchmarks/gpu_check.py`): the streaming promise checked on an accelerator.

Its parts run one process each (`zotune.bench.gpu_parts`: a watchdog, one JSON line per part as it
ends, a time budget). They check what only a GPU can show and measure the targets of
docs/performance.md, side by side in one process each:

- `directions`: Rademacher directions swept on the device (the Triton kernel on CUDA, and the eager
  kernel sequence) == the CPU's fused kernel, bit for bit; which kernel ran;
- `streamed_equals_resident`: streamed (both tiers) == resident on the device, bit for bit in float32,
  for zosgd, zoadam, n_directions=2 and lozo (losses, projected gradients, final weights);
- `memory`: peak device memory (allocated above what was in use before, and reserved) of a streamed
  step at two depths (flat) against resident (grows), every model gone before the next is built;
- `step_time`: a streamed step / a resident step, and a resident ZO step / two plain forwards, with
  full float32 and with TF32 products (`zotune train`'s default on CUDA), the precision recorded;
  streamed steps end when the engine's transfers have (`engine.wait()`);
- `sensitivity`: `zotune sensitivity`'s mask summed on the device, resident and streamed (each
  block held for its backward), against the CPU's (`zotune.bench.gpu_sensitivity`);
- `tf32`: the projected gradients' relative change under TF32, and its step-time ratio;
- `scale`: a Llama-7B-shaped model (random weights in host memory), all parameters trained (float32
  masters), streamed: peak device memory, seconds a step, and the bytes moved each way as a share of
  the measured link peaks (host to device, device to host, and both at once).

Forwards pass `use_cache=False` (HF would build a KV cache on every forward). On the CPU (`--device
cpu --quick`, as the test suite runs it) the same code runs on tiny shapes: the bitwise checks hold
and the device-memory figures are null.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the same GEMM bits on every call and stream

import torch  # noqa: E402
from torch import nn  # noqa: E402

QUIET = dict(log=lambda *a, **k: None)


def _llama_config(hidden: int, layers: int, inter: int, heads: int, vocab: int, tie: bool = False):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                max_position_embeddings=2048, tie_word_embeddings=tie, rms_norm_eps=1e-5)


def _model(config, device, dtype=torch.float32):
    """Random weights made on `device` (fast on a GPU), seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def part_directions(device, quick: bool, repeats: int) -> dict:
    from zotune.bench.gpu_kernels import check_method_kernels

    return {**check_directions(device, (1 << 22 if quick else 3 << 24) + 17),
            "methods": check_method_kernels(device, quick)}


def check_directions(device, n: int) -> dict:
    """The sweep an accelerator takes (eager, large chunks) against the CPU's fused kernel."""
    from zotune.methods.perturb import Directions

    start = torch.randn(n, generator=torch.Generator().manual_seed(0))
    cpu = start.clone()
    Directions("rademacher").add(cpu, 99, 1, 3, 1e-3, 0.999, -2e-4)
    here = start.to(device, copy=True)
    Directions("rademacher").add(here, 99, 1, 3, 1e-3, 0.999, -2e-4)
    eager = start.to(device, copy=True)
    slow = Directions("rademacher")
    slow.fused = False  # the eager kernel sequence, in accelerator-sized chunks
    slow.add(eager, 99, 1, 3, 1e-3, 0.999, -2e-4)
    from zotune.methods import triton_sweep

    kernel = "triton" if triton_sweep.available(here) else "eager"  # (after the sweep: a failed build says eager)
    out = {"values": n, "kernel": kernel, "equal": bool(torch.equal(cpu, here.cpu())),
           "eager_equal": bool(torch.equal(cpu, eager.cpu()))}
    if device.type == "cuda":  # the eager fallback gives the same bits at ~20 launches a chunk: a failure here
        out["triton_used"] = kernel == "triton"
    return out


def _run(config, device, tier, folder, method: dict, steps: int, batch):
    """(losses, grads, trained values) of a resident (tier None) or streamed run on `device`."""
    from zotune.methods import make_optimizer
    from zotune.stream import StreamConfig, stream_

    model = _model(config, "cpu")
    params = [p for p in model.parameters()]
    opt = make_optimizer(method.get("name", "zosgd"), params, seed=1, lr=1e-3, eps=1e-3,
                         **{k: v for k, v in method.items() if k != "name"})
    engine = None
    if tier is None:
        model.to(device)
    else:
        engine = stream_(model, StreamConfig(tier=tier, dir=folder), device, **QUIET)
    x = batch.to(device)
    losses, grads = [], []
    for _ in range(steps):
        closure = lambda: model(input_ids=x, labels=x, use_cache=False).loss  # noqa: E731
        losses.append(float(engine.step(opt, closure) if engine else opt.step(closure)))
        grads.append(list(opt.last.grads))
    values = [v.detach().cpu().clone() for v in (engine.trained_values() if engine else params)]
    if engine:
        engine.close()
    return losses, grads, values


def check_streamed_equals_resident(device, quick: bool, repeats: int = 0) -> dict:
    config = _llama_config(64 if quick else 512, 3 if quick else 4, 128 if quick else 1536, 4 if quick else 8,
                           1000 if quick else 8000, tie=True)
    batch = torch.randint(0, config.vocab_size, (2, 16 if quick else 64), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, method in {"zosgd": {}, "zoadam": {"name": "zoadam"}, "n_directions=2": {"n_directions": 2},
                         "lozo": {"name": "lozo", "interval": 2}}.items():
        resident = _run(config, device, None, None, method, 3, batch)
        for tier in ("cpu", "disk"):
            with tempfile.TemporaryDirectory() as tmp:
                streamed = _run(config, device, tier, f"{tmp}/blocks" if tier == "disk" else None, method, 3, batch)
            out[f"{name}/{tier}"] = (resident[0] == streamed[0] and resident[1] == streamed[1]
                                     and all(torch.equal(a, b) for a, b in zip(resident[2], streamed[2])))
    return out


def _timed_steps(step, device, repeats: int, engine=None) -> list[float]:
    """Seconds of each of `repeats` steps after a warm-up, each ending when the device and the engine's
    transfer worker are done (a write-back still in flight belongs to the step that sent it)."""
    step()  # warm-up: caches, allocator, the first fetch
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        if engine is not None:
            engine.wait()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _streamed_step(config, device, batch, tier="cpu", storage=None):
    from zotune.methods import make_optimizer
    from zotune.stream import StreamConfig, stream_

    model = _model(config, device).cpu()  # random values drawn fast on the device, then kept on the host
    opt = make_optimizer("zosgd", list(model.parameters()), seed=1, lr=1e-7, eps=1e-3)
    engine = stream_(model, StreamConfig(tier=tier, storage_dtype=storage), device, **QUIET)
    x = batch.to(device)
    return (lambda: engine.step(opt, lambda: model(input_ids=x, labels=x, use_cache=False).loss)), engine


def _resident_step(config, device, batch):
    from zotune.methods import make_optimizer

    model = _model(config, device)
    opt = make_optimizer("zosgd", list(model.parameters()), seed=1, lr=1e-7, eps=1e-3)
    x = batch.to(device)

    def forward():
        with torch.inference_mode():
            return model(input_ids=x, labels=x, use_cache=False).loss
    return (lambda: opt.step(forward)), forward, model


def measure_tf32(device, quick: bool, repeats: int = 6) -> dict:
    """What `model.tf32` (the default on CUDA) does to a ZO step: the same resident steps from the same
    weights with full float32 products and with TF32 ones; the projected gradients' mean relative
    change (TF32 must leave the estimate's signal intact) and the step-time ratio."""
    from zotune.precision import set_tf32

    if device.type != "cuda":
        return {"relative_grad_change": None, "tf32_step_time_ratio": None}
    config = _llama_config(256 if quick else 2048, 2 if quick else 4, 512 if quick else 5504, 4 if quick else 16,
                           1000 if quick else 8000)
    batch = torch.randint(0, config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    from zotune.methods import make_optimizer

    grads, times = {}, {}
    try:
        for enabled in (False, True):
            set_tf32(device, enabled)
            model = _model(config, device)
            opt = make_optimizer("zosgd", list(model.parameters()), seed=1, lr=1e-7, eps=1e-3)
            x = batch.to(device)
            got = []

            def forward():
                with torch.inference_mode():
                    return model(input_ids=x, labels=x, use_cache=False).loss

            def step():
                opt.step(forward)
                got.append(opt.last.grads[0])

            times[enabled] = statistics.median(_timed_steps(step, device, repeats))
            grads[enabled] = got  # the same step seeds from the same weights, warm-up included
            model = opt = None  # freed before the next setting's model
            torch.cuda.empty_cache()
    finally:
        set_tf32(device, False)
    full, tf32 = grads[False], grads[True]
    change = sum(abs(a - b) for a, b in zip(full, tf32)) / max(1e-30, sum(abs(a) for a in full))
    return {"relative_grad_change": change, "tf32_step_time_ratio": times[True] / times[False]}


def _peaks(make, device) -> dict:
    """Peak device bytes (allocated and reserved) of the second of two steps, above what was allocated
    before `make()` built its model; everything it built is gone when this returns."""
    _sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    step, close = make()
    step()
    _peak_reset(device)
    step()
    if close is not None:
        close()
    peak = _peak(device)
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    del step, close
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"allocated": None if peak is None else peak - base, "reserved": reserved}


def measure_memory(device, quick: bool, repeats: int = 0) -> dict:
    """Peak device memory of one step, streamed and resident, at two depths of the same shape (each
    measured above the memory in use before its model was built, with the previous model gone)."""
    out = {}
    depths = (2, 4) if quick else (4, 8)
    for layers in depths:
        config = _llama_config(64 if quick else 4096, layers, 128 if quick else 11008, 4 if quick else 32,
                               1000 if quick else 32000)
        batch = torch.randint(0, config.vocab_size, (4, 16 if quick else 128),
                              generator=torch.Generator().manual_seed(0))

        def streamed():
            step, engine = _streamed_step(config, device, batch)
            return (lambda: (step(), engine.wait())), engine.close

        def resident():
            return _resident_step(config, device, batch)[0], None
        for kind, make in (("streamed", streamed), ("resident", resident)):
            peaks = _peaks(make, device)
            out[f"{kind}_{layers}_layers"], out[f"{kind}_{layers}_layers_reserved"] = peaks["allocated"], \
                peaks["reserved"]
    a, b = depths
    if device.type == "cuda":
        out["streamed_growth"] = round(out[f"streamed_{b}_layers"] / out[f"streamed_{a}_layers"], 3)
        out["resident_growth"] = round(out[f"resident_{b}_layers"] / out[f"resident_{a}_layers"], 3)
        out["flat"] = out["streamed_growth"] <= 1.10
    return out


def measure_step_time(device, quick: bool, repeats: int) -> dict:
    """Streamed / resident step on a model that fits, and a ZO step / two forwards (resident), with full
    float32 products and with TF32 ones (`zotune train`'s default on CUDA); the state is recorded."""
    from zotune.precision import set_tf32

    out = {}
    for tf32 in ((False, True) if device.type == "cuda" else (False,)):
        set_tf32(device, tf32)
        try:
            out["tf32" if tf32 else "float32"] = _step_times(device, quick, repeats)
        finally:
            set_tf32(device, False)
    return out


def _step_times(device, quick: bool, repeats: int) -> dict:
    config = _llama_config(64 if quick else 4096, 2 if quick else 8, 128 if quick else 11008, 4 if quick else 32,
                           1000 if quick else 32000)
    batch = torch.randint(0, config.vocab_size, (4 if quick else 8, 16 if quick else 512),
                          generator=torch.Generator().manual_seed(0))
    resident_step, forward = _resident_step(config, device, batch)[:2]  # (the model lives in their closures)
    resident = _timed_steps(resident_step, device, repeats)
    forwards = _timed_steps(lambda: (forward(), forward()), device, repeats)
    resident_step = forward = None  # the resident model is gone before the streamed one is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step, engine = _streamed_step(config, device, batch)
    streamed = _timed_steps(step, device, repeats, engine)
    engine.close()
    med = statistics.median
    return {"shape": f"llama-7b width, {config.num_hidden_layers} layers, batch {tuple(batch.shape)}, float32",
            "matmul_precision": torch.get_float32_matmul_precision(),
            "resident_s": round(med(resident), 4), "streamed_s": round(med(streamed), 4),
            "two_forwards_s": round(med(forwards), 4),
            "streamed_over_resident": round(med(streamed) / med(resident), 3),
            "zo_step_over_two_forwards": round(med(resident) / med(forwards), 3)}


def _link_peaks(device, nbytes: int) -> dict | None:
    """Bytes a second of large copies between page-locked host memory and the device: each way alone,
    and both at once on two streams (what a step needs: every trained block comes and goes back)."""
    if device.type != "cuda":
        return None
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    dev = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    streams = [torch.cuda.Stream(device) for _ in range(2)]

    def timed(copies) -> float:
        best = 0.0
        for _ in range(5):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for stream, (dst, src) in zip(streams, copies):
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            best = max(best, len(copies) * nbytes / (time.perf_counter() - t0))
        return best
    return {"h2d": timed([(dev[0], host[0])]), "d2h": timed([(host[1], dev[1])]),
            "both": timed([(dev[0], host[0]), (host[1], dev[1])])}


def _host_model(config, device):
    """A float32 model whose blocks are random tensors in page-locked host memory (made on the device,
    one tensor at a time) and whose other parameters are on the device: no full copy is ever held.
    Every parameter is trained, so the blocks in host memory are the float32 masters themselves (a
    16-bit storage copy would only add to them: it matters for frozen tensors)."""
    from zotune.models import find_block_list
    from zotune.stream.folder import _skeleton

    model = _skeleton(config)
    _, layers = find_block_list(model)
    inside = {id(p) for p in layers.parameters()}
    pin = device.type == "cuda"
    for name, p in list(model.named_parameters()):
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        value = torch.ones(p.shape, device=device) if p.dim() == 1 else torch.randn(p.shape, device=device).mul_(0.02)
        if id(p) in inside:
            value = torch.empty(p.shape, pin_memory=pin).copy_(value)
        owner._parameters[name.rsplit(".", 1)[-1]] = nn.Parameter(value, requires_grad=False)
    for module in model.modules():  # buffers (rotary frequencies) to the device
        for n, b in module._buffers.items():
            if b is not None:
                module._buffers[n] = b.to(device)
    return model.eval()


def measure_scale(device, quick: bool, repeats: int) -> dict:
    """A Llama-7B shape, all trainable, streamed from host memory (the float32 masters of the blocks;
    the embeddings, final norm and head on the device)."""
    from zotune.methods import make_optimizer
    from zotune.shapes import random_config
    from zotune.stream import StreamConfig, stream_

    config = _llama_config(64, 4, 128, 4, 1000) if quick else random_config("llama-7b")
    t0 = time.perf_counter()
    model = _host_model(config, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    opt = make_optimizer("zosgd", params, seed=1, lr=1e-7, eps=1e-3)
    engine = stream_(model, StreamConfig(tier="cpu"), device, **QUIET)
    engine.attach(opt)
    setup = time.perf_counter() - t0
    batch = torch.randint(0, config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0)).to(device)
    step = lambda: engine.step(opt, lambda: model(input_ids=batch, labels=batch, use_cache=False).loss)  # noqa: E731
    loss = float(step())  # the first step: every block leaves perturbed
    _peak_reset(device)
    times = _timed_steps(step, device, 2 if quick else 3, engine)
    peak = _peak(device)
    engine.device_blocks = engine.prefetch + 1  # stream.device_blocks=2: a fetch waits for the write-back before it
    _peak_reset(device)
    lean_times = _timed_steps(step, device, 2 if quick else 3, engine)
    lean_peak = _peak(device)
    # Each step brings every block's float32 masters to the device and sends them back (all are trained).
    moved = sum(p.numel() * 4 for p in engine.layers.parameters())
    engine.close()
    links = _link_peaks(device, 1 << 30)
    sec = statistics.median(times)
    out = {"parameters": n, "setup_s": round(setup, 1), "first_loss": round(loss, 4), "step_s": round(sec, 3),
           "peak_device_bytes": peak, "peak_device_gib": None if peak is None else round(peak / 2**30, 3),
           "h2d_bytes_per_step": moved, "d2h_bytes_per_step": moved, "h2d_gbps": round(moved / sec / 1e9, 2),
           "d2h_gbps": round(moved / sec / 1e9, 2),
           "device_blocks_2": {"step_s": round(statistics.median(lean_times), 3), "peak_device_bytes": lean_peak,
                               "peak_device_gib": None if lean_peak is None else round(lean_peak / 2**30, 3)}}
    if links is not None:
        out["link_peak_gbps"] = {k: round(v / 1e9, 2) for k, v in links.items()}
        out["h2d_share_of_peak"] = round(moved / sec / links["h2d"], 3)
        out["d2h_share_of_peak"] = round(moved / sec / links["d2h"], 3)
        out["both_ways_share_of_peak"] = round(2 * moved / sec / links["both"], 3)  # the bound that matters
    return out
