"""`zotune bench ...`: the benchmarks' options; each parses, then calls its module in bench/."""

from __future__ import annotations

import argparse
import json
import sys

from zotune.config import ConfigError


def _bench(args) -> int:
    from zotune.bench.step import run_step_bench, run_task_bench

    log = (lambda *a, **k: None) if args.json else print
    result = run_step_bench(repeats=args.repeats, batch=args.batch, seq=args.seq, shape=args.shape, log=log)
    if args.task:
        result.update(run_task_bench(repeats=min(args.repeats, 5), log=log))
    if args.json:
        print(json.dumps(result))
    return 0


def _bench_probe(args) -> int:
    from zotune.bench.probe import run_probe_bench

    result = run_probe_bench(args.shape, args.batch, args.repeats, log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(result))
    return 0


def _bench_stream(args) -> int:
    from zotune.bench.stream import run_scale_bench, run_stream_bench

    log = (lambda *a, **k: None) if args.json else print
    depths = tuple(int(x) for x in args.depths.split(","))
    if len(depths) != 2:
        raise ConfigError(f"--depths {args.depths!r}: give two depths, e.g. 12,48")
    result = {}
    if not args.scale_only:
        result.update(run_stream_bench(args.shape, args.batch, args.seq, args.repeats, depths, args.trainable, log,
                                       args.method))
    if args.scale:
        result.update(run_scale_bench(args.scale, args.scale_steps, trainable=args.trainable, log=log))
    if args.json:
        print(json.dumps(result))
    return 0


def _bench_dist(args) -> int:
    from zotune.bench.dist import run_dist_bench

    log = (lambda *a, **k: None) if args.json else print
    result = run_dist_bench(args.shape, args.batch, args.seq, args.repeats, log)
    if args.json:
        print(json.dumps(result))
    return 0


def _bench_memory(args) -> int:
    from zotune.bench.memory import run_memory_bench

    log = (lambda *a, **k: None) if args.json else print
    result = run_memory_bench(args.shape, args.batch, args.seq, log)
    if args.json:
        print(json.dumps(result))
    return 0


def _bench_sensitive(args) -> int:
    from zotune.bench.sensitive import run_sensitive_bench

    if not 0 < args.density < 1:
        raise ConfigError(f"--density {args.density}: give a share between 0 and 1 (e.g. 0.001)")
    log = (lambda *a, **k: None) if args.json else print
    result = run_sensitive_bench(args.shape, args.layers or None, args.batch, args.seq, args.density, log)
    if args.json:
        print(json.dumps(result))
    return 0


def _bench_gpu(args) -> int:
    import time
    from pathlib import Path

    from zotune.bench.gpu_parts import PARTS, run_parts
    from zotune.files import check_new_file

    parts = [p.strip() for p in args.parts.split(",")] if args.parts else None
    unknown = [p for p in parts or [] if p not in PARTS]
    if unknown:
        raise ConfigError(f"--parts: {unknown[0]!r} is not a part; choose from {', '.join(PARTS)}")
    out = Path(args.out or f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    check_new_file(out, "--out")
    print(f"one JSON line per part, appended to {out} as each part ends", file=sys.stderr)
    return run_parts(args.device, args.quick, args.repeats, args.budget, out, parts, part_timeout=args.part_timeout)


def _bench_first_order(args) -> int:
    from zotune.bench.first_order import run_first_order

    result = run_first_order(args.overrides, args.lr, args.weight_decay,
                             log=(lambda *a, **k: None) if args.json else print)
    if args.json:
        print(json.dumps(result))
    return 0


def _shape_and_batch(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options every benchmark shares: the random-weight model, the batch, the repeats, --json."""
    parser.add_argument("--shape", default="opt-125m", help="random-weight shape: opt-125m, opt-350m, tiny, llama-7b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_bench(sub) -> None:
    """`zotune bench ...`: each benchmark's options and the function that runs it."""
    b = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    bsub = b.add_subparsers(dest="bench", required=True)
    s = bsub.add_parser("step", help="ZO step time / two plain forwards, zotune vs a MeZO-style step")
    _shape_and_batch(s, repeats=7)
    s.add_argument("--no-task", dest="task", action="store_false",
                   help="skip the SmolLM2 default-task part (needs the offline model package)")
    s.set_defaults(func=_bench)
    s = bsub.add_parser("probe", help="the default job's step: probes through the whole forward / the tail alone")
    s.add_argument("--shape", default="gemma-3-270m", help="a random-weight model shape (zotune.shapes)")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--json", action="store_true", help="print the results as one JSON line")
    s.set_defaults(func=_bench_probe)
    s = bsub.add_parser("stream", help="streamed step / resident step, in time and peak memory, at two depths")
    _shape_and_batch(s, repeats=5)
    s.add_argument("--depths", default="12,48", help="two block counts for the memory growth, e.g. 12,48")
    s.add_argument("--trainable", default="all", help="which parameters train (model.trainable forms)")
    s.add_argument("--method", default="zosgd", help="the ZO method stepped (zotune.list_methods())")
    s.add_argument("--scale", metavar="DIR", help="also run a step on a Llama-7B-shaped model (27 GB) streamed "
                                                   "from DIR (prepared there first if missing)")
    s.add_argument("--scale-steps", type=int, default=1)
    s.add_argument("--scale-only", action="store_true", help="with --scale: skip the OPT comparison")
    s.set_defaults(func=_bench_stream)
    s = bsub.add_parser("dist", help="distributed ZO: bytes sent per step, 2-rank speedup, slow-tier bytes per rank")
    _shape_and_batch(s, repeats=2)
    s.set_defaults(func=_bench_dist, batch=32)
    s = bsub.add_parser("memory", help="optimizer state bytes per trainable value and peak RSS of a step, per method")
    _shape_and_batch(s, repeats=1)
    s.set_defaults(func=_bench_memory)
    s = bsub.add_parser("sensitive", help="peak RSS of sensitive sparse ZO (int4 base, resident and from disk) / full "
                        "ZO's")
    s.add_argument("--shape", default="llama-7b", help="random-weight shape: opt-125m, opt-350m, tiny, llama-7b")
    s.add_argument("--layers", type=int, default=8, help="blocks of the shape (its own count: 0)")
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--seq", type=int, default=64)
    s.add_argument("--density", type=float, default=1e-3, help="the share of each block linear's entries that trains")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_bench_sensitive)
    s = bsub.add_parser("gpu", help="the streaming checks and targets on an accelerator (docs/performance.md), as JSON")
    s.add_argument("--device", default="cuda")
    s.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test, on any device)")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--budget", type=float, default=540, help="seconds for all parts; a part whose estimate does "
                   "not fit what is left is skipped (default 540: 9 minutes)")
    s.add_argument("--out", help="the JSON-lines file (new; default gpu-check-<time>.jsonl)")
    s.add_argument("--parts", help="comma-separated parts to run (default: all, in order)")
    s.add_argument("--part-timeout", type=float, help="seconds a part may run (default: 3x its estimate + 30)")
    s.set_defaults(func=_bench_gpu)
    s = bsub.add_parser("first-order", help="the backprop reference: AdamW on the same task, tensors and batches",
                        description="Trains what `zotune train` with the same section.key=value options would "
                                    "train, with AdamW on backprop gradients, and prints test accuracy before/after.")
    s.add_argument("--lr", type=float, default=1e-5, help="AdamW's learning rate (default 1e-5)")
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. run.steps=300 task.name=tweets")
    s.set_defaults(func=_bench_first_order)
