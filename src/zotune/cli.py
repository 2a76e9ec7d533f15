"""The `zotune` command: it parses, then calls train.py or bench/. No logic of its own."""

from __future__ import annotations

import argparse
import os
import re
import sys

from zotune.bench.cli import add_bench
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zotune", description="Fine-tune language models with forward passes only.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training(sub)
    _add_evaluation(sub)
    _add_stream(sub)
    add_bench(sub)
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
