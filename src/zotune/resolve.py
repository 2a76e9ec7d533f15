"""The configuration of a run, resolved in layers: defaults < what trains < YAML < task < overrides < flags."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from zotune.adapters import AdapterConfig
from zotune.combinations import check as check_combinations
from zotune.config import ConfigError, build, load_yaml, merge, parse_overrides
from zotune.methods import MethodConfig, method_config
from zotune.models import ModelConfig
from zotune.parallel import ParallelDims
from zotune.schedule import RunConfig
from zotune.stream import StreamConfig
from zotune.tasks import SUITE, TaskConfig, load_task_file
from zotune.tasks.prompts import command_line_escapes

SECTIONS = {"model": ModelConfig, "adapter": AdapterConfig, "task": TaskConfig, "method": MethodConfig,
            "run": RunConfig, "stream": StreamConfig, "parallel": ParallelDims}


# Settings whose default changed, with the value a run folder that does not name them was trained with.
_EARLIER_DEFAULTS = {"run": {"group_by_length": False}, "method": {"distribution": "gaussian"}}

# Defaults that depend on what trains, as data (measured on the default task, docs/compare.md). The
# final norm alone is a linear probe of the last hidden state: a few hundred values that train at lr
# 0.2 (the blocks at LOZO's 2.5e-4; ZO-SGD on them diverged at 3e-3), in cheap steps since every
# block is frozen and its output kept, so larger batches cost little. FZOO reached 0.797 there
# (mean of 3 seeds) where ZO-SGD reached 0.785 at the same 7,200 forwards. Anything else (blocks,
# LoRA, prefixes, scales) keeps the section defaults: LOZO, 1,200 steps of 16. A method named by the
# user takes the lr measured for it here, or else its own default.
TRAINABLE_DEFAULTS = {
    "final-norm": {"method": "fzoo", "lr": {"fzoo": 0.2, "zosgd": 0.2, "lozo": 0.2},  # lozo: ZO-SGD's bits on vectors
                   "run": {"steps": 800, "batch_size": 64, "eval_every": 400}},
}


def trainable_defaults(values: dict) -> dict:
    """The `TRAINABLE_DEFAULTS` layer under merged user `values` ({} when none applies)."""
    trainable = values.get("model", {}).get("trainable", ModelConfig.trainable)
    if values.get("adapter", {}).get("kind", "none") != "none" or not isinstance(trainable, str):
        return {}  # an adapter's tensors train, whatever model.trainable says
    entry = TRAINABLE_DEFAULTS.get(trainable)
    if entry is None:
        return {}
    name = values.get("method", {}).get("name", entry["method"])
    measured = isinstance(name, str) and name in entry["lr"]  # (a bad name is refused by MethodConfig)
    method = {"name": name, **({"lr": entry["lr"][name]} if measured else {})}
    return {"method": method, "run": dict(entry["run"])}


def resolve_configs(config_file=None, overrides=(), flags=None, run_folder: bool = False,
                    task: str | None = None) -> dict:
    """Defaults < `TRAINABLE_DEFAULTS` < YAML file < `task` < key=value overrides < flags; every section
    validated before step 0.

    `task` is a suite task's name (`task.name`) or a task file (YAML or Python, `load_task_file`); it
    replaces the task section of `config_file`.

    With `run_folder`, `config_file` is a run's own config.yaml: settings it does not name take the
    value they had when it was written (`_EARLIER_DEFAULTS`), so the run continues as it started.
    `model.trainable=auto` (or none named) is the probe here; `zotune train` settles it by a trial
    (`zotune.trial`) from `user_values` instead.
    """
    values = user_values(config_file, overrides, flags, run_folder, task)
    return build_configs(settle_auto(values), run_folder)


def user_values(config_file=None, overrides=(), flags=None, run_folder: bool = False, task: str | None = None,
                say=print) -> dict:
    """The merged layers the user gave (file, task, overrides, flags), before any default; a key given
    twice is said once (`say`)."""
    layers = [_EARLIER_DEFAULTS] if run_folder else []
    layers += [load_yaml(config_file)] if config_file else []
    if task:  # it replaces the task a config file (or a run folder) describes
        layers = [{k: v for k, v in layer.items() if k != "task"} for layer in layers]
        layers.append({"task": {"name": task} if task in SUITE else load_task_file(task)})
    notes: list[str] = []  # a key given twice: said once, at start-up (the last one counts, as in a shell)
    given = parse_overrides(list(overrides), notes)
    notes += [f"{section}.{key} is given as a flag ({value!r}) and as {section}.{key}={given[section][key]!r}: "
              f"the flag counts" for section, values in (flags or {}).items() for key, value in values.items()
              if key in given.get(section, {}) and str(given[section][key]) != str(value)]
    for note in notes:
        say(f"note: {note}")
    command_line = merge(given, flags or {})
    if "task" in command_line:
        command_line["task"] = command_line_escapes(command_line["task"])
    return merge(*layers, command_line)


def is_auto(values: dict) -> bool:
    """True when the user named nothing to train (or `model.trainable=auto`) and no adapter."""
    return values.get("adapter", {}).get("kind", "none") == "none" and \
        values.get("model", {}).get("trainable", "auto") == "auto"


def settle_auto(values: dict) -> dict:
    """`values` with `model.trainable=auto` (or none named) settled without a trial: the probe (with an
    adapter, whose tensors train, it is unused)."""
    if values.get("model", {}).get("trainable", "auto") != "auto":
        return values
    return merge(values, {"model": {"trainable": "final-norm"}})


def build_configs(values: dict, run_folder: bool = False) -> dict:
    """Every section built from `values` over its defaults (and `TRAINABLE_DEFAULTS`), checked together."""
    if not run_folder:  # a run folder names every option it was trained with
        values = merge(trainable_defaults(values), values)
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
    cfgs = {name: build(cls, values.get(name, {}), name) for name, cls in SECTIONS.items() if name != "method"}
    cfgs["method"] = method_config(values.get("method", {}))  # each method has its own options
    check_combinations(cfgs)
    return cfgs


def resolve_device(name: str) -> torch.device:
    """The compute device of this process, with its index.

    `auto` is CUDA when there is one, else the CPU. Under torchrun every process has its own
    accelerator: `cuda` or `cuda:K` gives the process of local rank L the device K + L.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device={name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    if module is None or not module.is_available():
        raise ConfigError(f"run.device={name!r} is not available on this machine; use run.device=cpu")
    local = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if device.type == "cuda" and len(visible) == 1:
        local = 0  # a scheduler gave this process one GPU of its own: it is cuda:0 here, whatever the rank
    index, count = (device.index or 0) + local, module.device_count()
    if index >= count:
        raise ConfigError(f"run.device={name!r}: the process of local rank {local} would use "
                          f"{device.type}:{index}, but this machine has {count}; start at most "
                          f"{count - (device.index or 0)} processes per machine")
    if device.type == "cuda":
        module.set_device(index)  # what launches without a device of their own (Triton's) run on
    return torch.device(device.type, index)


# What a resumed run (or an export, a replay, an evaluation of a run) may take differently from the run as
# it started: nothing that shapes its steps. More steps, the evaluation and snapshot cadence, trackers,
# the device (where the directions allow: session.py checks), paths that moved (the base model and a stream
# folder are identified by their content), and what only changes speed or fault handling.
MAY_CHANGE = {"run": {"steps", "eval_every", "snapshot_every", "report_to", "device", "out", "threads",
                      "eval_batch_size", "prefix_cache_mb", "patience"},
              "model": {"name", "cache_dir"}, "stream": {"dir", "prefetch", "device_blocks"},
              "parallel": {"perturb", "timeout", "check_every"}}


def recorded_options(cfgs: dict) -> dict:
    """Every option of `cfgs` as plain JSON values: what a run records when it starts (base.json)."""
    return json.loads(json.dumps({name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()}, default=str))


def check_as_recorded(recorded: dict | None, cfgs: dict, run, also_free: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, an option that differs from the run's record of it (`recorded_options` when it
    started; a run started before records were kept is not checked). `also_free`: sections the caller may
    change (an evaluation's own task)."""
    if not recorded:
        return
    now = recorded_options(cfgs)
    for section, values in recorded.items():
        if section in also_free:
            continue
        for key, was in values.items():
            is_now = now.get(section, {}).get(key, was)
            if is_now != was and key not in MAY_CHANGE.get(section, ()):
                raise ConfigError(f"{section}.{key} is {is_now!r} but run {run} was trained with {was!r}: a run "
                                  f"continues, exports and replays as it was recorded (config.yaml was edited, or "
                                  f"an option was given); for other settings start a new run, e.g. from "
                                  f"`zotune export {run}`")
