"""`zotune bench gpu` (or `benchmarks/gpu_check.py`): the streaming promise checked on an accelerator.

One command, one JSON object. It checks what only a GPU can show and measures the targets of
docs/performance.md, side by side in one process:

- `directions`: Rademacher directions swept on the device (the Triton kernel on CUDA, and the eager
  kernel sequence) == the CPU's fused kernel, bit for bit;
- `streamed_equals_resident`: streamed (both tiers) == resident on the device, bit for bit in float32,
  for zosgd, zoadam and n_directions=2 (losses, projected gradients, final weights);
- `memory`: peak device memory of a streamed step at two depths (flat) against resident (grows);
- `step_time`: a streamed step / a resident step, and a resident ZO step / two plain forwards;
- `tf32`: the same ZO steps with full float32 and with TF32 products (`model.tf32`, on by default on
  CUDA): the projected gradients' relative change and the step-time ratio;
- `scale`: a Llama-7B-shaped model (random weights in host memory), all parameters trained (float32 masters),
  streamed: peak device memory, seconds a step, and the host-to-device bandwidth reached as a share
  of the measured pinned-copy peak.

On the CPU (`--device cpu --quick`, as the test suite runs it) the same code runs on tiny shapes:
the bitwise checks hold and the device-memory figures are null.
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

    return {"values": n, "kernel": "triton" if triton_sweep.available(here) else "eager",
            "equal": bool(torch.equal(cpu, here.cpu())), "eager_equal": bool(torch.equal(cpu, eager.cpu()))}


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
        closure = lambda: model(input_ids=x, labels=x).loss  # noqa: E731
        losses.append(float(engine.step(opt, closure) if engine else opt.step(closure)))
        grads.append(list(opt.last.grads))
    values = [v.detach().cpu().clone() for v in (engine.trained_values() if engine else params)]
    if engine:
        engine.close()
    return losses, grads, values


def check_streamed_equals_resident(device, quick: bool) -> dict:
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


def _timed_steps(step, device, repeats: int) -> list[float]:
    step()  # warm-up: caches, allocator, the first fetch
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
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
    return (lambda: engine.step(opt, lambda: model(input_ids=x, labels=x).loss)), engine


def _resident_step(config, device, batch):
    from zotune.methods import make_optimizer

    model = _model(config, device)
    opt = make_optimizer("zosgd", list(model.parameters()), seed=1, lr=1e-7, eps=1e-3)
    x = batch.to(device)

    def forward():
        with torch.inference_mode():
            return model(input_ids=x, labels=x).loss
    return (lambda: opt.step(forward)), forward, model


def measure_tf32(device, quick: bool, steps: int = 6) -> dict:
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
                    return model(input_ids=x, labels=x).loss

            def step():
                opt.step(forward)
                got.append(opt.last.grads[0])

            times[enabled] = statistics.median(_timed_steps(step, device, steps))
            grads[enabled] = got  # the same step seeds from the same weights, warm-up included
            model = opt = None  # freed before the next setting's model
            torch.cuda.empty_cache()
    finally:
        set_tf32(device, False)
    full, tf32 = grads[False], grads[True]
    change = sum(abs(a - b) for a, b in zip(full, tf32)) / max(1e-30, sum(abs(a) for a in full))
    return {"relative_grad_change": change, "tf32_step_time_ratio": times[True] / times[False]}


def measure_memory(device, quick: bool) -> dict:
    """Peak device memory of one step, streamed and resident, at two depths of the same shape."""
    out = {}
    for layers in ((2, 4) if quick else (4, 8)):
        config = _llama_config(64 if quick else 4096, layers, 128 if quick else 11008, 4 if quick else 32,
                               1000 if quick else 32000)
        batch = torch.randint(0, config.vocab_size, (4, 16 if quick else 128),
                              generator=torch.Generator().manual_seed(0))
        step, engine = _streamed_step(config, device, batch)
        step()
        _peak_reset(device)
        step()
        out[f"streamed_{layers}_layers"] = _peak(device)
        engine.close()
        del step, engine
        step, _, model = _resident_step(config, device, batch)
        step()
        _peak_reset(device)
        step()
        out[f"resident_{layers}_layers"] = _peak(device)
        del step, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    a, b = (2, 4) if quick else (4, 8)
    if device.type == "cuda":
        out["streamed_growth"] = round(out[f"streamed_{b}_layers"] / out[f"streamed_{a}_layers"], 3)
        out["resident_growth"] = round(out[f"resident_{b}_layers"] / out[f"resident_{a}_layers"], 3)
        out["flat"] = out["streamed_growth"] <= 1.10
    return out


def measure_step_time(device, quick: bool, repeats: int) -> dict:
    """Streamed / resident step on a model that fits, and a ZO step / two forwards (resident)."""
    config = _llama_config(64 if quick else 4096, 2 if quick else 8, 128 if quick else 11008, 4 if quick else 32,
                           1000 if quick else 32000)
    batch = torch.randint(0, config.vocab_size, (4 if quick else 8, 16 if quick else 512),
                          generator=torch.Generator().manual_seed(0))
    resident_step, forward, model = _resident_step(config, device, batch)
    resident = _timed_steps(resident_step, device, repeats)
    forwards = _timed_steps(lambda: (forward(), forward()), device, repeats)
    resident_step = forward = None  # free the resident model before the streamed one
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step, engine = _streamed_step(config, device, batch)
    streamed = _timed_steps(step, device, repeats)
    engine.close()
    med = statistics.median
    return {"shape": f"llama-7b width, {config.num_hidden_layers} layers, batch {tuple(batch.shape)}, float32",
            "resident_s": round(med(resident), 4), "streamed_s": round(med(streamed), 4),
            "two_forwards_s": round(med(forwards), 4),
            "streamed_over_resident": round(med(streamed) / med(resident), 3),
            "zo_step_over_two_forwards": round(med(resident) / med(forwards), 3)}


def _pinned_peak(device, nbytes: int) -> float | None:
    """Host-to-device bytes a second of one large copy from page-locked memory."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = max(best, nbytes / (start.elapsed_time(end) / 1e3))
    return best


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


def measure_scale(device, quick: bool, steps: int) -> dict:
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
    step = lambda: engine.step(opt, lambda: model(input_ids=batch, labels=batch).loss)  # noqa: E731
    loss = float(step())  # the first step: every block leaves perturbed
    _peak_reset(device)
    times = _timed_steps(step, device, steps)
    peak = _peak(device)
    # Each step brings every block's float32 masters to the device and sends them back.
    h2d = sum(p.numel() * 4 for p in engine.layers.parameters())
    pinned = _pinned_peak(device, 1 << 30)
    engine.close()
    sec = statistics.median(times)
    out = {"parameters": n, "setup_s": round(setup, 1), "first_loss": round(loss, 4), "step_s": round(sec, 3),
           "peak_device_bytes": peak, "peak_device_gib": None if peak is None else round(peak / 2**30, 3),
           "h2d_bytes_per_step": h2d, "h2d_gbps": round(h2d / sec / 1e9, 2)}
    if pinned is not None:
        out["pinned_peak_gbps"] = round(pinned / 1e9, 2)
        out["h2d_share_of_peak"] = round(h2d / sec / pinned, 3)
    return out


def run_gpu_check(device: str = "cuda", quick: bool = False, repeats: int = 5, log=print) -> dict:
    """Every check and measurement above; returns one dict (the caller prints it as JSON)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index or 0)
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
              "torch": torch.__version__, "quick": quick}
    for name, fn in [("directions", lambda: check_directions(dev, (1 << 22 if quick else 3 << 24) + 17)),
                     ("streamed_equals_resident", lambda: check_streamed_equals_resident(dev, quick)),
                     ("memory", lambda: measure_memory(dev, quick)),
                     ("step_time", lambda: measure_step_time(dev, quick, repeats)),
                     ("tf32", lambda: measure_tf32(dev, quick)),
                     ("scale", lambda: measure_scale(dev, quick, 2 if quick else 3))]:
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 -- one failed part must not hide the others' figures
            result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        log(f"{name}: {time.perf_counter() - t0:.1f}s")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    result["passed"] = bool(result["directions"].get("equal")) and bool(result["directions"].get("eager_equal")) \
        and all(v is True for v in result["streamed_equals_resident"].values())
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
