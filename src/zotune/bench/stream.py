"""`zotune bench stream`: a streamed ZO step against a resident one, in time and in memory.

- time: resident, RAM-tier and disk-tier steps on the same random-weight model and batch,
  interleaved in one process (the disk tier reads from the page cache when the folder fits in RAM);
- memory: each configuration in a fresh process, at two depths of the same architecture; peak RSS
  (the kernel's high-water mark, reset after set-up) and peak anonymous memory (sampled), so that
  file pages the kernel may drop are told apart from memory the process holds;
- scale (`--scale`): steps on a Llama-7B-shaped model whose blocks on disk exceed this machine's RAM.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

QUIET = dict(log=lambda *a, **k: None)


class PeakMemory:
    """Peak RSS since `start()` (VmHWM after a reset) and peak anonymous memory (sampled every 2 ms)."""

    def __init__(self):
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_anon = max(self.peak_anon, self.status()["RssAnon"])

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.peak_anon = self.status()["RssAnon"]
        self._thread.start()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        st = self.status()
        return {"peak_rss": st["VmHWM"], "peak_anon": max(self.peak_anon, st["RssAnon"])}


def _batch(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def _random_model(shape: str, layers: int | None):
    from transformers import AutoModelForCausalLM

    from zotune.shapes import random_config

    torch.manual_seed(0)
    config = random_config(shape, **({"num_hidden_layers": layers} if layers else {}))
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def _stepper(model, engine, trainable: str, method: str = "zosgd"):
    from zotune.methods import make_optimizer
    from zotune.models import select_trainable

    params = [p for _, p in select_trainable(model, trainable)]
    opt = make_optimizer(method, params, lr=1e-7, eps=1e-3, seed=0)
    if engine is None:
        return opt.step
    return lambda closure: engine.step(opt, closure)


def _drained(step, engine):
    """A streamed step timed until its last write-back and prefetch are done, so that no background
    transfer spills into the next configuration's timing."""
    def run(closure):
        loss = step(closure)
        engine.wait()
        return loss
    return run


def measure_memory(spec: dict) -> dict:
    """In this (fresh) process: set up one configuration, then peak memory and time over its steps."""
    from zotune.stream import StreamConfig, load_streamed, stream_

    tier, steps = spec["tier"], spec["steps"]
    if tier == "disk":
        model, engine = load_streamed(spec["folder"], **QUIET)
    else:
        model = _random_model(spec["shape"], spec["layers"])
        engine = stream_(model, StreamConfig(tier="cpu"), **QUIET) if tier == "cpu" else None
    ids = _batch(model.config.vocab_size, spec["batch"], spec["seq"])
    step = _stepper(model, engine, spec["trainable"], spec.get("method", "zosgd"))
    if engine is not None:
        step = _drained(step, engine)

    def closure():
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    peak = PeakMemory()
    peak.start()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(closure)
        times.append(time.perf_counter() - t)
    if engine is not None:
        engine.close()
    return {**peak.stop(), "step_s": min(times), "step_times": [round(t, 2) for t in times]}


def _in_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "zotune.bench.stream", json.dumps(spec)], capture_output=True,
                         text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        raise RuntimeError(f"benchmark child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare(shape: str, layers: int | None, folder: Path) -> None:
    from zotune.shapes import random_config
    from zotune.stream import prepare_folder

    config = random_config(shape, **({"num_hidden_layers": layers} if layers else {}))
    prepare_folder(str(folder), config=config, **QUIET)


def run_time_bench(shape: str, batch: int, seq: int, repeats: int, trainable: str, workdir: Path, log=print,
                   method: str = "zosgd") -> dict:
    """Resident, RAM-tier and disk-tier steps, interleaved in this process."""
    from zotune.stream import StreamConfig, load_streamed, stream_, write_folder

    resident = _random_model(shape, None)
    ram = _random_model(shape, None)
    ram_engine = stream_(ram, StreamConfig(tier="cpu"), **QUIET)
    folder = workdir / "time-disk"
    write_folder(_random_model(shape, None), str(folder), torch.float32, **QUIET)
    disk, disk_engine = load_streamed(str(folder), **QUIET)
    ids = _batch(resident.config.vocab_size, batch, seq)
    runs = {"resident": (resident, _stepper(resident, None, trainable, method)),
            "ram_tier": (ram, _drained(_stepper(ram, ram_engine, trainable, method), ram_engine)),
            "disk_tier": (disk, _drained(_stepper(disk, disk_engine, trainable, method), disk_engine))}
    closures = {name: (lambda m=m: m(input_ids=ids, labels=ids, use_cache=False).loss) for name, (m, _) in runs.items()}
    for name, (_, step) in runs.items():  # warm-up
        step(closures[name])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (_, step) in runs.items():
            t = time.perf_counter()
            step(closures[name])
            times[name].append(time.perf_counter() - t)
    losses = {name: float(closures[name]()) for name in runs}  # the same model, seeds and batch: the same loss
    ram_engine.close()
    disk_engine.close()
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"resident_step_s": round(med["resident"], 4), "ram_tier_step_s": round(med["ram_tier"], 4),
            "disk_tier_step_s": round(med["disk_tier"], 4),
            "ram_tier_time_ratio": round(med["ram_tier"] / med["resident"], 3),
            "disk_tier_time_ratio": round(med["disk_tier"] / med["resident"], 3),
            "ram_tier_time_ratio_min": round(min(times["ram_tier"]) / min(times["resident"]), 3),
            "disk_tier_time_ratio_min": round(min(times["disk_tier"]) / min(times["resident"]), 3),
            "same_loss": len(set(losses.values())) == 1}


def run_quant_bench(shape: str, batch: int, seq: int, repeats: int, workdir: Path, trainable: str = "last-blocks:1",
                    log=print) -> dict:
    """A float base against an int4 one (the same random weights, `trainable` kept float), both on
    the disk tier, interleaved: seconds a step and bytes read from and written to the slow tier a step."""
    from zotune.models import select_trainable
    from zotune.quant import quantize_
    from zotune.stream import load_streamed, write_folder

    runs = {}
    for kind in ("float32", "int4"):
        model = _random_model(shape, None)
        if kind == "int4":
            keep = {id(p) for _, p in select_trainable(model, trainable)}
            quantize_(model, "int4", keep, **QUIET)
        folder = workdir / f"quant-{kind}"
        write_folder(model, str(folder), torch.float32, **QUIET)
        del model
        streamed, engine = load_streamed(str(folder), **QUIET)
        runs[kind] = (streamed, engine, _drained(_stepper(streamed, engine, trainable), engine))
    ids = _batch(runs["float32"][0].config.vocab_size, batch, seq)
    closures = {k: (lambda m=m: m(input_ids=ids, labels=ids, use_cache=False).loss) for k, (m, _, _) in runs.items()}
    for kind, (_, _, step) in runs.items():  # warm-up
        step(closures[kind])
    times: dict[str, list[float]] = {k: [] for k in runs}
    moved = {k: [0, 0] for k in runs}
    for _ in range(repeats):
        for kind, (_, engine, step) in runs.items():
            read, written = engine.tier.bytes_read, engine.tier.bytes_written
            t = time.perf_counter()
            step(closures[kind])
            times[kind].append(time.perf_counter() - t)
            moved[kind][0] += engine.tier.bytes_read - read
            moved[kind][1] += engine.tier.bytes_written - written
    for _, engine, _ in runs.values():
        engine.close()
    med = {k: statistics.median(t) for k, t in times.items()}
    out = {"quant_trainable": trainable}
    for kind in runs:
        out[f"{kind}_base_step_s"] = round(med[kind], 4)
        out[f"{kind}_base_read_mb_per_step"] = round(moved[kind][0] / repeats / 1e6, 1)
        out[f"{kind}_base_written_mb_per_step"] = round(moved[kind][1] / repeats / 1e6, 1)
    out["int4_over_float_step_time"] = round(med["int4"] / med["float32"], 3)
    out["int4_over_float_bytes_read"] = round(moved["int4"][0] / moved["float32"][0], 3)
    log(f"quantized base, disk tier ({trainable} trainable, float): a step reads "
        f"{out['float32_base_read_mb_per_step']:,} MB (float32 base) vs {out['int4_base_read_mb_per_step']:,} MB "
        f"(int4 base, {out['int4_over_float_bytes_read']:.2f}x) and takes {out['float32_base_step_s']:.3f}s vs "
        f"{out['int4_base_step_s']:.3f}s ({out['int4_over_float_step_time']:.2f}x); written "
        f"{out['float32_base_written_mb_per_step']:,} / {out['int4_base_written_mb_per_step']:,} MB")
    return out


def run_stream_bench(shape: str = "opt-125m", batch: int = 4, seq: int = 128, repeats: int = 5,
                     depths: tuple[int, int] = (12, 48), trainable: str = "all", log=print,
                     method: str = "zosgd") -> dict:
    with tempfile.TemporaryDirectory(prefix="zotune-bench-") as tmp:
        workdir = Path(tmp)
        log(f"{shape} shape, batch {batch} x {seq}, fp32, trainable {trainable}, {method}, "
            f"{torch.get_num_threads()} threads")
        result = {"shape": shape, "batch": batch, "seq": seq, "trainable": trainable, "method": method}
        result.update(run_time_bench(shape, batch, seq, repeats, trainable, workdir, log, method))
        log(f"step time (median of {repeats} interleaved): resident {result['resident_step_s']:.3f}s, "
            f"RAM tier {result['ram_tier_step_s']:.3f}s ({result['ram_tier_time_ratio']:.2f}x), "
            f"disk tier {result['disk_tier_step_s']:.3f}s ({result['disk_tier_time_ratio']:.2f}x)")
        result.update(run_quant_bench(shape, batch, seq, repeats, workdir, log=log))
        memory = {}
        for layers in depths:
            folder = workdir / f"disk-{layers}"
            _prepare(shape, layers, folder)
            for tier in ("resident", "cpu", "disk"):
                spec = {"tier": tier, "shape": shape, "layers": layers, "batch": batch, "seq": seq, "steps": 2,
                        "trainable": trainable, "folder": str(folder), "method": method}
                memory[(tier, layers)] = _in_child(spec)
        shallow, deep = depths
        log(f"{'peak memory (MiB)':28}{f'{shallow} layers':>14}{f'{deep} layers':>14}{'growth':>9}")
        names = {"resident": "resident step, RSS", "cpu": "RAM tier, RSS", "disk": "disk tier, RSS"}
        for tier, label in names.items():
            a, b = memory[(tier, shallow)]["peak_rss"], memory[(tier, deep)]["peak_rss"]
            result[f"{tier}_peak_rss_mib"] = [round(a / 2**20), round(b / 2**20)]
            log(f"{label:28}{a / 2**20:>14,.0f}{b / 2**20:>14,.0f}{b / a:>9.2f}")
        a, b = memory[("disk", shallow)]["peak_anon"], memory[("disk", deep)]["peak_anon"]
        result["disk_peak_anon_mib"] = [round(a / 2**20), round(b / 2**20)]
        log(f"{'disk tier, anonymous':28}{a / 2**20:>14,.0f}{b / 2**20:>14,.0f}{b / a:>9.2f}")
        result["streamed_peak_growth"] = round(
            memory[("disk", deep)]["peak_rss"] / memory[("disk", shallow)]["peak_rss"], 3)
        result["resident_peak_growth"] = round(
            memory[("resident", deep)]["peak_rss"] / memory[("resident", shallow)]["peak_rss"], 3)
        result["disk_vs_resident_peak"] = [
            round(memory[("disk", d)]["peak_rss"] / memory[("resident", d)]["peak_rss"], 3) for d in depths]
        log(f"streamed (disk tier) peak growth {result['streamed_peak_growth']:.3f}x, resident "
            f"{result['resident_peak_growth']:.3f}x ({shallow} -> {deep} layers)")
    return result


def run_scale_bench(folder: str, steps: int = 1, batch: int = 1, seq: int = 32, trainable: str = "all",
                    log=print) -> dict:
    """Steps on a Llama-7B-shaped model whose stream folder is larger than RAM (prepared once if missing)."""
    from zotune.shapes import random_config
    from zotune.stream import is_stream_folder, prepare_folder

    if not is_stream_folder(folder):
        log(f"preparing {folder} (random weights, Llama-7B shape); this writes about 27 GB once")
        t = time.perf_counter()
        prepare_folder(folder, config=random_config("llama-7b"), log=log)
        log(f"prepared in {time.perf_counter() - t:.0f}s")
    files = [f for f in Path(folder).iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files if not f.name.endswith(".slots.bin"))  # the model's own weights
    slots = sum(f.stat().st_size for f in files if f.name.endswith(".slots.bin"))
    spec = {"tier": "disk", "folder": folder, "batch": batch, "seq": seq, "steps": steps, "trainable": trainable}
    got = _in_child(spec)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    result = {"scale_folder_gb": round(size / 1e9, 1), "scale_slots_gb": round(slots / 1e9, 1),
              "machine_ram_gb": round(ram / 1e9, 1),
              "scale_peak_rss_mib": round(got["peak_rss"] / 2**20),
              "scale_peak_anon_mib": round(got["peak_anon"] / 2**20),
              "scale_step_s": round(got["step_s"], 1), "scale_step_times": got["step_times"],
              "scale_batch": f"{batch} x {seq}", "scale_trainable": trainable}
    log(f"scale: {result['scale_folder_gb']} GB of weights on disk ({result['machine_ram_gb']} GB of RAM; "
        f"{result['scale_slots_gb']} GB more once every block has written its second slot): one ZO step "
        f"({trainable} trainable, batch {batch} x {seq}) in {result['scale_step_s']}s (each: "
        f"{', '.join(map(str, result['scale_step_times']))}), peak RSS "
        f"{result['scale_peak_rss_mib']:,} MiB, peak anonymous {result['scale_peak_anon_mib']:,} MiB")
    return result


if __name__ == "__main__":  # one configuration, in a fresh process: `python -m zotune.bench.stream SPEC`
    print(json.dumps(measure_memory(json.loads(sys.argv[1]))))
