"""`zotune bench memory`: optimizer state per trainable value, and peak memory of a step, per method.

Each method runs two steps on the same random-weight model in a fresh process: the state bytes are
counted from the optimizer's state tensors, the peak RSS of the steps from the kernel (reset after
set-up), next to a plain forward's. Four more rows hold the block linears in int8, then int4
(`zotune.quant`): a plain forward, and ZO-SGD on the quantization scales alone (QZO).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def _child(spec: dict) -> dict:
    from zotune.bench.stream import PeakMemory, _batch, _random_model
    from zotune.methods import make_optimizer

    model = _random_model(spec["shape"], None)
    params = list(model.parameters())
    if spec.get("quantize"):
        from zotune.models import select_trainable
        from zotune.quant import quantize_

        quantize_(model, spec["quantize"], set(), log=lambda *a: None)
        params = [p for _, p in select_trainable(model, "scales")]
    ids = _batch(model.config.vocab_size, spec["batch"], spec["seq"])

    def closure():
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    peak = PeakMemory()
    peak.start()
    if spec["method"] == "forward":
        with torch.inference_mode():
            closure()
        state = 0
    else:
        opt = make_optimizer(spec["method"], params, lr=1e-7)
        for _ in range(2):
            opt.step(closure)
        state = sum(t.nbytes for s in opt.tensor_state.values() for t in s.values() if torch.is_tensor(t))
        assert state == 4 * opt.state_floats(), (state, opt.state_floats())
    return {**peak.stop(), "state_bytes": state, "values": sum(p.numel() for p in params)}


def run_memory_bench(shape: str = "opt-125m", batch: int = 4, seq: int = 128, log=print) -> dict:
    from zotune.methods import list_methods

    result = {"shape": shape, "batch": batch, "seq": seq}
    log(f"{shape} shape, batch {batch} x {seq}, every parameter trainable, fp32")
    log(f"{'':20}{'state bytes / value':>20}{'peak RSS (MiB)':>16}")
    runs = [("forward", None), *((m, None) for m in list_methods()),
            *((method, kind) for kind in ("int8", "int4") for method in ("forward", "zosgd"))]
    for method, quantized in runs:
        spec = {"shape": shape, "batch": batch, "seq": seq, "method": method, "quantize": quantized}
        out = subprocess.run([sys.executable, "-m", "zotune.bench.memory", json.dumps(spec)],
                             capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode:
            raise RuntimeError(f"memory benchmark of {method} failed: {out.stderr.strip().splitlines()[-1:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        per_value = got["state_bytes"] / got["values"]
        name = "plain forward" if method == "forward" else method
        if quantized:
            name = f"{quantized} base, " + ("forward" if method == "forward" else "QZO")
        result[f"{quantized}-{method}" if quantized else method] = {"state_bytes_per_value": per_value,
                                                                    "peak_rss_mib": round(got["peak_rss"] / 2**20)}
        log(f"{name:20}{per_value:>20.1f}{got['peak_rss'] / 2**20:>16,.0f}")
    return result


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
