"""The GPU check run part by part, so that a lent GPU's 15 minutes always yield every figure they can.

Each part of `zotune.bench.gpu` runs in its own process (a sticky CUDA error, an out-of-memory kill or
a hang takes that part alone) under a watchdog: `faulthandler` dumps every thread's stack and ends the
process a little before the part's deadline, and the parent kills it at the deadline. The moment a
part ends, one JSON line is appended to the output file (flushed) and printed: its status (`ok`,
`failed`: a bitwise check did not hold, `error` with the whole traceback, `timeout` with the thread
dump, `skipped`: the remaining `--budget` was below its estimate), its figures and its seconds.
Exit code: 0 every part ok, 1 a bitwise check failed, 2 a part errored, timed out or was skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name: (module:function, estimated seconds on one H100 / with --quick on the CPU, whether the part is a
# bitwise check). The estimates budget the parts: the scale part alone loads 27 GB.
PARTS = {
    "directions": ("zotune.bench.gpu:part_directions", 20, 10, True),
    "streamed_equals_resident": ("zotune.bench.gpu:check_streamed_equals_resident", 60, 60, True),
    "stress": ("zotune.bench.gpu_stress:check_stress", 40, 5, True),
    "sensitivity": ("zotune.bench.gpu_sensitivity:check_sensitivity", 30, 10, True),
    "memory": ("zotune.bench.gpu:measure_memory", 60, 20, False),
    "step_time": ("zotune.bench.gpu:measure_step_time", 60, 20, False),
    "tf32": ("zotune.bench.gpu:measure_tf32", 40, 5, False),
    "scale": ("zotune.bench.gpu:measure_scale", 180, 20, False),
}
FAULT = "ZOTUNE_GPU_CHECK_FAULT"  # tests: "PART:raise" or "PART:hang" makes that part fail so


def run_parts(device: str, quick: bool, repeats: int, budget: float, out: Path, parts: list[str] | None = None,
              say=print, part_timeout: float | None = None) -> int:
    """Run the parts in turn within `budget` seconds, appending one JSON line each to `out`; the exit code.
    A part gets at most `part_timeout` seconds (default: three times its estimate, and 30 more)."""
    started = time.perf_counter()
    codes = []
    with out.open("a", encoding="utf-8") as f:
        for name in parts or list(PARTS):
            _, full, small, _ = PARTS[name]
            estimate = small if quick else full
            left = budget - (time.perf_counter() - started)
            if left < estimate:
                row = {"part": name, "status": "skipped", "reason": f"{left:.0f}s of the budget left, estimated "
                                                                  f"{estimate}s"}
            else:
                row = _run_part(name, device, quick, repeats, deadline=min(left, part_timeout or 3 * estimate + 30))
            codes.append({"ok": 0, "failed": 1}.get(row["status"], 2))
            line = json.dumps(row)
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
            say(line)
    return max(codes, default=0)


def _run_part(name: str, device: str, quick: bool, repeats: int, deadline: float) -> dict:
    """One part in a child process: its row (status, result or the error's whole text, seconds)."""
    args = [sys.executable, "-c", "import sys; from zotune.bench.gpu_parts import child; sys.exit(child())",
            name, device, "1" if quick else "0", str(repeats), str(max(1.0, min(deadline - 10, 0.8 * deadline)))]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=deadline,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as e:
        return {"part": name, "status": "timeout", "seconds": round(time.perf_counter() - t0, 1),
                "error": f"no result in {deadline:.0f}s", "threads": _text(e.stderr)[-8000:]}
    seconds = round(time.perf_counter() - t0, 1)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
        ok = PARTS[name][3] is False or _holds(result)
        return {"part": name, "status": "ok" if ok else "failed", "seconds": seconds, "result": result}
    why = (f"killed by signal {-done.returncode} (out of memory?)" if done.returncode < 0 else
           "the watchdog fired: a hang (every thread's stack below)" if "Timeout (" in done.stderr else
           f"exit code {done.returncode}")
    return {"part": name, "status": "timeout" if "Timeout (" in done.stderr else "error", "seconds": seconds,
            "error": why, "traceback": done.stderr[-8000:]}


def _holds(result) -> bool:
    """A bitwise part holds when every boolean it reports is True."""
    if isinstance(result, dict):
        return all(_holds(v) for k, v in result.items() if isinstance(v, (bool, dict)))
    return result is True


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def child() -> int:
    """In the part's process: run it under the watchdog and print its result as the last line of stdout."""
    import faulthandler

    name, device, quick, repeats, watchdog = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), \
        float(sys.argv[5])
    faulthandler.dump_traceback_later(watchdog, exit=True)  # every thread's stack, then exit, before the kill
    fault = os.environ.get(FAULT, "")
    if fault == f"{name}:raise":
        raise RuntimeError(f"{name} forced to raise ({FAULT})")
    if fault == f"{name}:hang":
        time.sleep(10 * watchdog)
    import importlib

    import torch

    module, function = PARTS[name][0].split(":")
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)
    result = getattr(importlib.import_module(module), function)(dev, quick, repeats)
    print(json.dumps(result), flush=True)
    return 0
