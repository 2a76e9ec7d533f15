"""The `zotune` command: it parses, then calls train.py or bench/. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from zotune.config import ConfigError, parse_overrides
from zotune.parallel import DivergedError

# flag -> (section, option): shortcuts for the most used options; any option is also `section.key=value`.
FLAGS = {
    "--model": ("model", "name"), "--trainable": ("model", "trainable"), "--dtype": ("model", "dtype"),
    "--data": ("task", "data"), "--template": ("task", "template"),
    "--method": ("method", "name"), "--lr": ("method", "lr"), "--eps": ("method", "eps"),
    "--weight-decay": ("method", "weight_decay"), "--n-directions": ("method", "n_directions"),
    "--out": ("run", "out"), "--steps": ("run", "steps"), "--batch-size": ("run", "batch_size"),
    "--eval-every": ("run", "eval_every"), "--seed": ("run", "seed"), "--device": ("run", "device"),
    "--offload": ("stream", "tier"), "--offload-dir": ("stream", "dir"),
    "--data-parallel": ("parallel", "data"), "--perturb-parallel": ("parallel", "perturb"),
}
TASK_HELP = ("a suite task (sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop, rotten_tomatoes, "
             "bbc_news, tweets) or a task file (.yaml / .py); task.* options override it")


def _train(args) -> int:
    from zotune.lr_search import choose_lr, pop_auto_lr, why_no_search
    from zotune.prefix import PrefixStore
    from zotune.resolve import build_configs, is_auto, settle_auto, user_values
    from zotune.train import train
    from zotune.trial import choose_trainable, why_no_trial

    flags: dict[str, dict] = {}
    for flag, (section, key) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            flags.setdefault(section, {})[key] = value
    values = user_values(args.config, args.overrides, flags, task=args.task)
    values, lr_auto = pop_auto_lr(values)  # method.lr=auto: a search after what trains is known
    cfgs, trial = None, None
    store = PrefixStore(shared=True)  # a batch's frozen prefix computed once for the trial, the search and the run
    speaks = os.environ.get("RANK", "0") == "0"  # (rank 0 speaks for the run)
    if is_auto(values):  # nothing named to train: a short trial on dev chooses (zotune.trial)
        why_not = why_no_trial(values)
        if not why_not:
            cfgs, trial = choose_trainable(values, store=store)
        elif speaks:
            print(f"note: model.trainable=auto trains the final norm {why_not}")
    cfgs = cfgs or build_configs(settle_auto(values))
    if lr_auto:
        why_not = why_no_search(cfgs)
        if not why_not:
            cfgs, search = choose_lr(cfgs, store=store)
            trial = {**(trial or {}), "lr_search": search}
        elif speaks:
            print(f"note: method.lr=auto takes the method's default lr {cfgs['method'].lr:g} {why_not}")
    summary = train(cfgs, trial=trial, prefix_store=store)
    return {"finished": 0, "interrupted": 130}.get(summary["status"], 1)


def _sensitivity(args) -> int:
    from pathlib import Path

    from zotune.files import check_new_file
    from zotune.resolve import build_configs, settle_auto, user_values
    from zotune.sensitivity import make_mask

    check_new_file(Path(args.out), "--out")
    if args.rows < 1 or args.batch_size < 1:
        raise ConfigError("--rows and --batch-size must be >= 1 (e.g. --rows 128 --batch-size 8)")
    flags = {section: {key: value} for section, key, value in (("model", "name", args.model),
                                                                ("task", "data", args.data)) if value}
    cfgs = build_configs(settle_auto(user_values(args.config, args.overrides, flags, task=args.task)))
    make_mask(cfgs, Path(args.out), args.density, args.rows, args.batch_size, last_blocks=args.last_blocks)
    return 0


def _resume(args) -> int:
    from pathlib import Path

    from zotune.resolve import resolve_configs
    from zotune.train import train

    config = Path(args.run_dir) / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{args.run_dir} is not a zotune run folder (no config.yaml); pass the folder of a run")
    changed = parse_overrides(args.overrides)
    if set(changed) - {"run", "parallel"}:
        raise ConfigError("resume takes only run.* and parallel.* overrides (e.g. run.steps=2000): the rest of a run "
                          "is fixed by its log")
    cfgs = resolve_configs(config, args.overrides, {"run": {"out": args.run_dir}}, run_folder=True)
    summary = train(cfgs, resume=True)
    return {"finished": 0, "interrupted": 130}.get(summary["status"], 1)


def _rebuild(args) -> int:
    from zotune.weights import rebuild

    rebuild(args.run_dir, args.out, use_snapshots=args.command == "export")
    return 0


def _eval(args) -> int:
    from zotune.evaluation import evaluate_source

    overrides = list(args.overrides) + ([f"task.data={args.data}"] if args.data else [])
    evaluate_source(args.model, overrides, tuple(s for s in args.split.split(",") if s), args.out,
                    args.batch_size, args.device, task=args.task)
    return 0


def _compare(args) -> int:
    from zotune.compare import compare

    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give seeds as numbers, e.g. 0,1,2") from None
    compare(args.run, args.forwards, args.evals, args.out, args.overrides, seeds=seeds, target=args.target)
    return 0


def _bench(args) -> int:
    from zotune.bench.step import run_step_bench, run_task_bench

    log = (lambda *a, **k: None) if args.json else print
    result = run_step_bench(repeats=args.repeats, batch=args.batch, seq=args.seq, shape=args.shape, log=log)
    if args.task:
        result.update(run_task_bench(repeats=min(args.repeats, 5), log=log))
    if args.json:
        print(json.dumps(result))
    return 0


def _prepare(args) -> int:
    from zotune.models import ModelConfig, checkpoint_folder
    from zotune.shapes import random_config
    from zotune.stream import prepare_folder

    if args.random:
        config = random_config(args.random, **({"num_hidden_layers": args.layers} if args.layers else {}))
        prepare_folder(args.out, config=config, storage_dtype=args.storage_dtype, seed=args.seed)
    else:
        prepare_folder(args.out, checkpoint=str(checkpoint_folder(ModelConfig(name=args.model))),
                       storage_dtype=args.storage_dtype)
    print(f"train on it with: zotune train --model {args.out}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zotune", description="Fine-tune language models with forward passes only.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training(sub)
    _add_evaluation(sub)
    _add_stream(sub)
    _add_bench(sub)
    return parser


def _add_training(sub) -> None:
    """train, resume, replay, export."""
    t = sub.add_parser("train", help="fine-tune (defaults: SmolLM2-135M-Instruct on Rotten Tomatoes, offline)",
                       description="Options come from defaults, then --config FILE, then section.key=value, "
                                   "then flags.")
    t.add_argument("--config", help="YAML file with sections model, task, method, run")
    t.add_argument("--task", help=TASK_HELP)
    for flag, (section, key) in FLAGS.items():
        t.add_argument(flag, default=None, help=f"same as {section}.{key}=VALUE")
    t.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. method.lr=1e-3 run.steps=100")
    t.set_defaults(func=_train)

    sub.add_parser("launch", help="torchrun with zotune's exit codes and one line per rank: zotune launch "
                   "--nproc-per-node 2 train parallel.data=2 ...")
    r = sub.add_parser("resume", help="continue a stopped or killed run where it stopped, bit for bit")
    r.add_argument("run_dir")
    r.add_argument("overrides", nargs="*", metavar="run.key=value", help="e.g. run.steps=2000 to train longer")
    r.set_defaults(func=_resume)
    m = sub.add_parser("sensitivity", help="the mask of sensitive weights (squared gradients, measured once) for "
                       "model.trainable=sensitive:MASK")
    m.add_argument("--out", required=True, help="a new .safetensors file for the mask")
    m.add_argument("--config", help="YAML file: its model and task sections are used")
    m.add_argument("--model", help="the model (default: the default model)")
    m.add_argument("--task", help=TASK_HELP)
    m.add_argument("--data", help="same as task.data=VALUE (a data file or built-in set)")
    m.add_argument("--density", type=float, default=1e-3, help="the share of block linear weights kept (0.001)")
    m.add_argument("--rows", type=int, default=128, help="training rows the gradients are summed over")
    m.add_argument("--last-blocks", type=int, help="only the last K blocks' linears (a frozen prefix before them)")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. task.template=...")
    m.set_defaults(func=_sensitivity)
    for name, text in (("replay", "rebuild the fine-tuned model from the base model and the step log alone"),
                       ("export", "write the fine-tuned model as a standard HF folder (snapshot + log)")):
        e = sub.add_parser(name, help=text)
        e.add_argument("run_dir")
        e.add_argument("--out", required=True, help="a new folder for the model")
        e.set_defaults(func=_rebuild)


def _add_evaluation(sub) -> None:
    """eval, compare."""
    e = sub.add_parser("eval", help="the task's metrics for a model or a run folder's weights, without training",
                       description="Evaluate a model (built-in name, HF folder, .gguf file) or a run folder (its "
                                   "trained weights at the latest step, with its own task) on the task's splits.")
    e.add_argument("--model", help="a model or a run folder (default: the default model)")
    e.add_argument("--task", help=TASK_HELP)
    e.add_argument("--data", help="same as task.data=VALUE")
    e.add_argument("--split", default="dev,test", help="comma-separated: dev, test, train (default: dev,test)")
    e.add_argument("--out", help="JSON file (default: RUN/eval.json for a run folder, else ./eval.json)")
    e.add_argument("--batch-size", type=int, help="default: run.eval_batch_size")
    e.add_argument("--device", default="auto")
    e.add_argument("overrides", nargs="*", metavar="task.key=value", help="e.g. task.template='{text} Overall:'")
    e.set_defaults(func=_eval)

    c = sub.add_parser("compare", help="several methods and setups, the same budget of forward passes, one table",
                       description="Each --run is METHOD [section.key=value ...]; the trailing section.key=value "
                                   "options apply to every run (task, model, run).")
    c.add_argument("--run", action="append", default=[], metavar="'METHOD [key=value ...]'")
    c.add_argument("--forwards", type=int, default=7200, help="forward passes per run (default: the demo's 7,200)")
    c.add_argument("--evals", type=int, default=4, help="dev evaluations per run, at the same forward counts")
    c.add_argument("--out", default="runs/compare", help="a new folder for the runs, table and plot")
    c.add_argument("--seeds", default="0", help="run.seed of each repeat, e.g. 0,1,2: the table gives mean ± spread")
    c.add_argument("--target", type=float, help="also report the forward passes each run took to reach this dev metric")
    c.add_argument("overrides", nargs="*", metavar="section.key=value")
    c.set_defaults(func=_compare)


def _add_stream(sub) -> None:
    st = sub.add_parser("stream", help="block streaming: prepare a disk-tier folder")
    stsub = st.add_subparsers(dest="stream", required=True)
    p = stsub.add_parser("prepare", help="write a model's blocks to a stream folder, one block at a time",
                         description="From a model (built-in name, local folder, .gguf) or with random weights "
                                     "of a named shape; never holds more than one block in memory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model zotune can load: built-in name, local folder or .gguf file")
    src.add_argument("--random", metavar="SHAPE", help="random weights of a shape: tiny, opt-125m, opt-350m, llama-7b")
    p.add_argument("--layers", type=int, help="with --random: number of blocks")
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_prepare)


def _add_bench(sub) -> None:
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


def _joined_negative_numbers(argv: list[str]) -> list[str]:
    """`--eps -1e-3` as `--eps=-1e-3`: argparse takes a value starting with "-" for an option of its own,
    unless it reads as a plain negative integer or decimal."""
    out = []
    for a in argv:
        if out and out[-1] in FLAGS and re.fullmatch(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # torchrun's options, then a zotune command: parsed by torchrun (launch.py)
        from zotune.launch import launch

        return launch(argv[1:])
    parser = build_parser()
    argv = _joined_negative_numbers(argv)
    # Overrides may stand between flags (`--lr 1e-3 run.steps=5 --out x`): argparse takes the
    # first run of them positionally and leaves the rest to us.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("train", "resume", "compare")
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not takes_overrides]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = args.overrides + extra
    try:
        return args.func(args)
    except ConfigError as e:
        _say_line(f"zotune: error: {e}")
        return 2
    except KeyboardInterrupt:
        _say_line("zotune: interrupted")
        return 130
    except DivergedError as e:  # a rank died, hung or disagrees: the run folder stays resumable
        _say_line(f"zotune: error: {e}")
        return 1


def _say_line(text: str) -> None:
    """One line on stderr in one write: ranks sharing a terminal (torchrun) never interleave their lines
    (print writes the text and the newline apart, and stderr writes through)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
