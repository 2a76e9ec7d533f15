"""`zotune bench sensitive`: the peak memory of sensitive sparse ZO against MeZO's full ZO, side by side.

Each case runs two ZO-SGD steps on the same random-weight model in a fresh process, and reports the
peak RSS of the steps (reset after set-up) and the model's bytes at rest. The mask is drawn at random
(`density` of each block linear's entries): memory does not depend on which entries train, and a
random model has no sensitive weights to find. The cases:
- full ZO on every weight, float32 (MeZO: the reference of the ratios);
- the sensitive entries on a float32 base, then on an int4 base (`zotune.quant`);
- the last block's whole tensors on an int4 base (what a quantized run trained before masks);
- the sensitive entries on an int4 base streamed from disk (`--offload disk`): the folder holds the
  base, a block at a time is in memory, the deltas stay outside it;
- a plain forward, float32 and int4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

CASES = {  # name: (what trains, quantized base, streamed from disk)
    "full ZO, float32": ("all", None, False),
    "sensitive, float32 base": ("sensitive", None, False),
    "sensitive, int4 base": ("sensitive", "int4", False),
    "last block, int4 base": ("last-blocks:1", "int4", False),
    "sensitive, int4 base on disk": ("sensitive", "int4", True),
    "forward, float32": ("forward", None, False),
    "forward, int4": ("forward", "int4", False),
}


def random_mask(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """`density` of each block linear's entries, drawn at random."""
    from zotune.models import find_blocks

    gen, out = torch.Generator().manual_seed(seed), {}
    for path, block in find_blocks(model):
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear):
                n = m.weight.numel()
                picked = torch.randperm(n, generator=gen)[:max(1, round(density * n))]
                out[f"{path}.{name}.weight"] = picked.sort().values
    return out


def _child(spec: dict) -> dict:
    from zotune.bench.stream import PeakMemory, _batch, _random_model
    from zotune.methods import make_optimizer
    from zotune.models import select_trainable
    from zotune.quant import _release_freed_memory, quantize_
    from zotune.sparse_delta import wrap_entries
    from zotune.stream import StreamConfig, stream_

    trains, quantized, on_disk = CASES[spec["case"]]
    model = _random_model(spec["shape"], spec["layers"])
    mask = random_mask(model, spec["density"]) if trains == "sensitive" else None
    if mask is not None and not on_disk:  # (as a run: the deltas first, then their bases quantized with the rest)
        wrap_entries(model, mask)
    spec_of = {"sensitive": "sensitive:(random)", "forward": "all"}.get(trains, trains)
    if quantized:
        keep = set() if trains in ("forward", "sensitive") else {id(p) for _, p in select_trainable(model, spec_of)}
        quantize_(model, quantized, keep, log=lambda *a: None)
    engine = folder = None
    if on_disk:  # the folder holds the base; the deltas are attached on it and stay outside the blocks
        folder = tempfile.TemporaryDirectory()
        engine = stream_(model, StreamConfig(tier="disk", dir=os.path.join(folder.name, "blocks")), log=lambda *a: None)
        wrap_entries(model, mask)
    _release_freed_memory()
    params = [p for _, p in select_trainable(model, spec_of)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    at_rest = sum(storages.values())  # each storage once: a tied head, and a streamed block's 1-element stand-ins
    ids = _batch(model.config.vocab_size, spec["batch"], spec["seq"])

    def closure():
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    opt = make_optimizer("zosgd", params, lr=1e-7, eps=1e-3, seed=0)
    if engine is not None:
        engine.attach(opt)
    peak = PeakMemory()
    peak.start()
    for _ in range(2):
        if trains == "forward":
            with torch.inference_mode():
                closure()
        elif engine is not None:
            engine.step(opt, closure)
        else:
            opt.step(closure)
    got = peak.stop()
    if engine is not None:
        engine.close()
        folder.cleanup()
    return {**got, "at_rest": at_rest, "values": sum(p.numel() for p in params)}


def run_sensitive_bench(shape: str = "llama-7b", layers: int | None = 8, batch: int = 2, seq: int = 64,
                        density: float = 1e-3, log=print, cases=tuple(CASES)) -> dict:
    """The cases (the first is the reference of the ratios), each in its own process."""
    result = {"shape": shape, "layers": layers, "batch": batch, "seq": seq, "density": density, "cases": {}}
    log(f"{shape} shape{f', {layers} blocks' if layers else ''}, batch {batch} x {seq}, a random {density:.1%} "
        f"mask, 2 ZO-SGD steps a case")
    log(f"{'':32}{'trained values':>16}{'at rest (MiB)':>15}{'peak RSS (MiB)':>16}{'/ full ZO':>11}")
    full = None
    for case in cases:
        spec = {"case": case, "shape": shape, "layers": layers, "batch": batch, "seq": seq, "density": density}
        out = subprocess.run([sys.executable, "-m", "zotune.bench.sensitive", json.dumps(spec)],
                             capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode:
            raise RuntimeError(f"the case {case!r} failed: {out.stderr.strip().splitlines()[-1:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        peak = got["peak_rss"] / 2**20
        full = full or peak
        result["cases"][case] = {"trained_values": got["values"], "at_rest_mib": round(got["at_rest"] / 2**20),
                                 "peak_rss_mib": round(peak), "of_full_zo": round(peak / full, 3)}
        trained = f"{got['values']:,}" if CASES[case][0] != "forward" else ""
        log(f"{case:32}{trained:>16}{got['at_rest'] / 2**20:>15,.0f}{peak:>16,.0f}{peak / full:>11.2f}")
    return result


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
