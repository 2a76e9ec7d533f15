"""`zotune bench dist`: what distributed ZO sends, and what it gains, on gloo with local processes.

- bytes per step per rank (the payload this rank puts into collectives) for two model sizes;
- speedup of 2 ranks x 1 thread over 1 rank x 1 thread on the same global batch (data parallel);
- with the disk tier, bytes read from the slow tier per rank per step at 1, 2 and 4 ranks.
Each configuration runs in fresh processes started the way torchrun starts them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(spec: dict) -> dict:
    """One rank (or the single process): K ZO steps on a random-weight model; returns what it measured."""
    from zotune.bench.stream import _random_model
    from zotune.methods import ZOSGD
    from zotune.parallel import Group, ParallelDims
    from zotune.stream import load_streamed

    torch.set_num_threads(spec["threads"])
    group = Group.from_env(ParallelDims(data=spec["data"], perturb=spec.get("perturb", 1)), torch.device("cpu"))
    engine = None
    if spec.get("folder"):
        model, engine = load_streamed(spec["folder"], group=group, log=lambda *a: None)
    else:
        model = _random_model(spec["shape"], spec.get("layers"))
    opt = ZOSGD(list(model.parameters()), lr=1e-7, eps=1e-3, seed=0, group=group)
    n = spec["batch"]
    ids = torch.randint(0, model.config.vocab_size, (n, spec["seq"]), generator=torch.Generator().manual_seed(0))
    rows, share = group.rows(n)
    mine = ids[rows]

    def closure():
        return model(input_ids=mine, labels=mine, use_cache=False).loss

    def step():
        if engine is not None:
            engine.step(opt, closure, share)
            engine.wait()
        else:
            opt.step(closure, share)

    step()  # warm-up
    sent0 = group.bytes_sent
    read0 = engine.tier.bytes_read if engine is not None else 0
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = {"step_s": min(times),
              "bytes_per_step": (group.bytes_sent - sent0) / spec["steps"],
              "slow_tier_bytes_per_step":
                  ((engine.tier.bytes_read - read0) if engine is not None else 0) / spec["steps"],
              "parameters": sum(p.numel() for p in model.parameters()) if engine is None else None}
    if engine is not None:
        engine.close()
    group.close()
    return result


def _launch(n: int, spec: dict) -> dict:
    """Run `worker(spec)` on n local ranks (or one plain process when n == 1); rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(n):
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if n > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "zotune.bench.dist", json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"benchmark rank failed: {err.strip().splitlines()[-1:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def run_dist_bench(shape: str = "opt-125m", batch: int = 16, seq: int = 128, steps: int = 2, log=print) -> dict:
    from zotune.shapes import random_config
    from zotune.stream import prepare_folder

    result = {"shape": shape, "batch": batch, "seq": seq}
    # 1. What crosses the network per step, for a small and a large model (data = 2 ranks).
    for name, size in (("small", "tiny"), ("large", shape)):
        got = _launch(2, {"shape": size, "data": 2, "threads": 1, "batch": 4, "seq": 32, "steps": 3})
        result[f"bytes_per_step_{name}"] = got["bytes_per_step"]
        result[f"parameters_{name}"] = got["parameters"]
        log(f"{size:>9}: {got['parameters'] / 1e6:7.1f}M parameters, {got['bytes_per_step']:.0f} bytes sent per step "
            f"per rank (full-gradient data parallelism: {4 * got['parameters'] / 1e6:,.0f} MB)")
    # 2. The same global batch on 1 rank x 1 thread and on 2 ranks x 1 thread.
    spec = {"shape": shape, "threads": 1, "batch": batch, "seq": seq, "steps": steps}
    one = _launch(1, {**spec, "data": 1})
    two = _launch(2, {**spec, "data": 2})
    result.update(step_s_1_rank=round(one["step_s"], 3), step_s_2_ranks=round(two["step_s"], 3),
                  speedup_2_ranks=round(one["step_s"] / two["step_s"], 3))
    log(f"{shape}, global batch {batch} x {seq}: 1 rank x 1 thread {one['step_s']:.2f}s a step, 2 ranks x 1 thread "
        f"{two['step_s']:.2f}s: {result['speedup_2_ranks']:.2f}x")
    # 3. Slow-tier traffic per rank with the disk tier, each rank reading its slice of every block.
    with tempfile.TemporaryDirectory(prefix="zotune-dist-") as tmp:
        folder = Path(tmp) / "blocks"
        prepare_folder(str(folder), config=random_config("tiny", num_hidden_layers=4), log=lambda *a: None)
        for n in (1, 2, 4):
            got = _launch(n, {"folder": str(folder), "data": n, "threads": 1, "batch": 4, "seq": 32, "steps": 2})
            result[f"slow_tier_bytes_per_rank_{n}"] = got["slow_tier_bytes_per_step"]
            log(f"disk tier, {n} rank(s): {got['slow_tier_bytes_per_step'] / 2**20:.2f} MiB read from the slow tier "
                f"per rank per step")
    return result


if __name__ == "__main__":  # one rank: `python -m zotune.bench.dist SPEC`
    print(json.dumps(worker(json.loads(sys.argv[1]))))
