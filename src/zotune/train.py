"""The training loop, written out: evaluate, train with forward passes only, evaluate again."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zotune.adapters import AdapterConfig, apply_adapter
from zotune.config import ConfigError, build, load_yaml, merge, parse_overrides
from zotune.methods import METHODS, MethodConfig, NonFiniteLossError, StepRecord, make_optimizer, method_config
from zotune.methods.perturb import FORMAT as DIRECTIONS_FORMAT
from zotune.methods.perturb import device_dependent, drawn_on
from zotune.models import ModelConfig, load_model, parse_trainable, resolve_source, select_trainable
from zotune.precision import Masters, Precision, set_tf32
from zotune.prefix import FrozenPrefix
from zotune.quant import QWEIGHT_KIND, dequantize_, quantize_
from zotune.parallel import DivergedError, Group, ParallelDims, text_digest, weights_digest
from zotune.runs import FollowerRun, RunConfig, RunFolder, entries, is_disk_full, remove_new_entries, tensor_digest
from zotune.stream import (StreamConfig, export_streamed, is_stream_folder, keeps_state, load_streamed, stream_,
                           unstream_)
from zotune.combinations import check as check_combinations
from zotune.schedule import lr_factor
from zotune.tasks import SUITE, Task, TaskConfig, load_task_file, make_task
from zotune.tasks.base import command_line_escapes
from zotune.trackers import open_trackers

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


def resolve_configs(config_file=None, overrides=(), flags=None, run_folder: bool = False, task: str | None = None) -> dict:
    """Defaults < `TRAINABLE_DEFAULTS` < YAML file < `task` < key=value overrides < flags; every section
    validated before step 0.

    `task` is a suite task's name (`task.name`) or a task file (YAML or Python, `load_task_file`); it
    replaces the task section of `config_file`.

    With `run_folder`, `config_file` is a run's own config.yaml: settings it does not name take the
    value they had when it was written (`_EARLIER_DEFAULTS`), so the run continues as it started.
    """
    layers = [_EARLIER_DEFAULTS] if run_folder else []
    layers += [load_yaml(config_file)] if config_file else []
    if task:  # it replaces the task a config file (or a run folder) describes
        layers = [{k: v for k, v in layer.items() if k != "task"} for layer in layers]
        layers.append({"task": {"name": task} if task in SUITE else load_task_file(task)})
    command_line = merge(parse_overrides(list(overrides)), flags or {})
    if "task" in command_line:
        command_line["task"] = command_line_escapes(command_line["task"])
    values = merge(*layers, command_line)
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
    index, count = (device.index or 0) + local, module.device_count()
    if index >= count:
        raise ConfigError(f"run.device={name!r}: the process of local rank {local} would use {device.type}:{index}, but "
                          f"this machine has {count}; start at most {count - (device.index or 0)} processes per machine")
    return torch.device(device.type, index)


@torch.inference_mode()
def evaluate(model, task: Task, examples, batch_size: int, device, desc: str = "eval", group: Group | None = None) -> dict:
    """The task's metrics (`metric` names the headline) and mean loss, batched and grouped by length.

    With a process group every rank evaluates its share of the examples and the counts are summed.
    """
    model.eval()
    if group is not None:
        examples = examples[group.rank::group.world]
    counts = task.zero_counts()
    batches = list(task.batches(examples, batch_size, by_length=True)) if examples else []
    lockstep = group is not None  # every rank runs as many forwards (streamed blocks are fetched together)
    if lockstep:
        extra = int(group.max([len(batches)])[0]) - len(batches)
        for _ in range(extra):
            task.evaluate_batch(model, task.collate(task.test[:1] or task.train[:1]).to(device), lockstep)
    with tqdm(total=len(examples), desc=desc, unit="ex", leave=False, file=sys.stderr,
              disable=group is not None and not group.is_main) as bar:
        for batch in batches:
            for key, value in task.evaluate_batch(model, batch.to(device), lockstep).items():
                counts[key] += value
            bar.update(len(batch))
    if group is not None:
        counts = dict(zip(counts, group.sum(list(counts.values()))))
    return task.metrics(counts)


def _metric_record(prefix: str, result: dict) -> dict:
    """The metrics.jsonl fields of an evaluation: its headline metric and its loss."""
    return {f"{prefix}_{result['metric']}": result[result["metric"]], f"{prefix}_loss": result["loss"]}


class _StopOnCtrlC:
    """First Ctrl-C: finish the current step, then stop cleanly. Second Ctrl-C: abort now."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        message = "\nstopping after this step (Ctrl-C again to abort now)\n"
        try:  # a raw write: the handler may run inside a write to sys.stderr (the progress bar's), where print fails
            os.write(sys.stderr.fileno(), message.encode())
        except (OSError, ValueError):  # a stderr without a file descriptor (captured)
            print(message, end="", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _batches(n_examples: int, batch_size: int, seed: int, lengths: list[int] | None = None):
    """(batch id, example indices) forever: batches are fixed once, their order reshuffled every epoch.

    Fixed batches let the frozen prefix of each batch be computed once and kept across epochs. With
    `lengths`, the shuffled examples are sorted by length within groups of 50 batches (the grouping
    of HF's `group_by_length`): a batch holds similar lengths, so little of it is padding.
    """
    gen = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(n_examples, generator=gen).tolist()
    if lengths is not None:
        group = 50 * batch_size
        shuffled = [i for start in range(0, n_examples, group)
                    for i in sorted(shuffled[start: start + group], key=lengths.__getitem__)]
    batches = [shuffled[i: i + batch_size] for i in range(0, n_examples, batch_size)]
    while True:
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield b, batches[b]


class Session:
    """A loaded model, its trainable tensors and its optimizer, for a new or an existing run.

    With streaming, the blocks live on a tier and `step` visits each once (`zotune.stream`). A disk
    tier is itself the checkpoint of the blocks: the run's snapshots then hold only the trainable
    tensors outside the blocks, and on resume each block catches up from its own recorded step.
    """

    def __init__(self, cfgs: dict, run: RunFolder, device, log, resume: bool = False, group: Group | None = None):
        self.engine, self._new_folder = None, None
        self._restored: Masters | None = None  # float32 values of a 16-bit RAM-tier run's restore
        try:
            self._open(cfgs, run, device, log, resume, group)
        except ConfigError:  # refused before training: a stream folder written just now goes away again
            if self.engine is not None:
                self.engine.close()
            if self._new_folder is not None:
                remove_new_entries(*self._new_folder)
            raise

    def _open(self, cfgs: dict, run: RunFolder, device, log, resume: bool, group: Group | None) -> None:
        self.run, self.log, self.device = run, log, device
        model_cfg, method_cfg = cfgs["model"], cfgs["method"]
        self.stream_cfg: StreamConfig = cfgs.get("stream") or StreamConfig()
        self.blocks_path = model_cfg.blocks_path
        self.engine = None
        folder = model_cfg.name if is_stream_folder(model_cfg.name) else (
            self.stream_cfg.dir if self.stream_cfg.tier == "disk" and is_stream_folder(self.stream_cfg.dir) else None)
        if folder:  # blocks already on disk: load only what lies outside them
            self.model, self.engine = load_streamed(folder, device, model_cfg.dtype, self.stream_cfg.prefetch, group, log)
            quantized = any(s.dtype in QWEIGHT_KIND for specs in self.engine.tier.specs for s in specs)
            if model_cfg.quantize != "none" and not quantized:
                raise ConfigError(f"the stream folder {folder} holds float blocks, but model.quantize={model_cfg.quantize}; "
                                  f"drop model.quantize, or give a new --offload-dir to write quantized blocks")
            self.tokenizer = _folder_tokenizer(folder)
            base_hash = self.engine.tier.manifest["base_digest"]
        else:
            if resume and self.stream_cfg.tier == "disk" and run.read_steps()[0]:
                raise ConfigError(f"the stream folder {self.stream_cfg.dir} of this run is missing: its blocks are the "
                                  f"run's weights; restore the folder, or start a new run")
            # Loaded on the CPU. Resident, the model goes to the device once it is complete (quantized,
            # adapted) below; with a tier, only what lies outside the blocks ever does (stream_).
            writer = group is None or group.is_main  # one writer of a disk tier; the other ranks then open it
            if self.stream_cfg.tier != "disk" or writer:
                self.model, self.tokenizer = load_model(model_cfg, log=log)
            if self.stream_cfg.tier == "disk":  # a new disk tier from the loaded model, before anything trains
                if writer:
                    self._quantize(model_cfg, log)  # the folder holds the quantized blocks
                    if (cfgs.get("adapter") or AdapterConfig()).kind == "none":  # refused before the folder is written
                        select_trainable(self.model, model_cfg.trainable, self.blocks_path)
                    self._new_folder = (Path(self.stream_cfg.dir), entries(Path(self.stream_cfg.dir)))
                    self.engine = stream_(self.model, self.stream_cfg, device, self.blocks_path, log=log)
                    self.tokenizer.save_pretrained(self.stream_cfg.dir)  # the folder is a complete model source
                if group is not None:
                    group.barrier()
                    if writer:
                        self.engine.join(group)
                    else:
                        self.model, self.engine = load_streamed(self.stream_cfg.dir, device, model_cfg.dtype,
                                                                self.stream_cfg.prefetch, group, log)
                        self.tokenizer = _folder_tokenizer(self.stream_cfg.dir)
                base_hash = self.engine.tier.manifest["base_digest"]
            else:
                base_hash = tensor_digest(self.model.state_dict().values())
        base = run.write_base({"model": model_cfg.name, "source": folder or "/".join(
            str(x) for x in resolve_source(model_cfg) if x), "hash": base_hash, "directions": DIRECTIONS_FORMAT,
            "device": drawn_on(device), "float32_masters": True})
        _check_directions_device(base, method_cfg, device)
        adapter = cfgs.get("adapter") or AdapterConfig()
        if self.engine is None:  # (a disk tier's blocks were quantized before they were written)
            self._quantize(model_cfg, log)
        self.model, named = apply_adapter(self.model, adapter, cfgs["run"].seed)
        if self.stream_cfg.tier == "none" and self.engine is None:
            self.model.to(device)
        if not named:
            named = select_trainable(self.model, model_cfg.trainable, model_cfg.blocks_path)
        self.params = [p for _, p in named]
        # A resident 16-bit model trains float32 masters of its trained tensors (zotune.precision); runs
        # started before masters existed resume as they were trained.
        resident = self.stream_cfg.tier == "none" and self.engine is None
        self.masters = Masters(self.params) if resident and base["float32_masters"] and Masters.needed(self.params) \
            else None
        self.opt = make_optimizer(method_cfg.name, self.trained, seed=cfgs["run"].seed, group=group,
                                  directions_format=base["directions"], **method_cfg.options())
        if self.engine is not None:
            self.engine.attach(self.opt)

    def _quantize(self, model_cfg: ModelConfig, log) -> None:
        """A quantized base (model.quantize): every frozen block linear quantized; what trains stays float."""
        if model_cfg.quantize == "none":
            return
        only_scales = all(kind == "scales" for kind, _ in parse_trainable(model_cfg.trainable))
        keep = set() if only_scales else \
            {id(p) for _, p in select_trainable(self.model, model_cfg.trainable, model_cfg.blocks_path)}
        quantize_(self.model, model_cfg.quantize, keep, model_cfg.blocks_path, log)

    @property
    def trained(self) -> list[torch.Tensor]:
        """What the optimizer moves: the trainable tensors, or their float32 masters (a 16-bit model)."""
        return self.masters.values if self.masters is not None else self.params

    def _snapshot_params(self) -> list[torch.Tensor]:
        """What a snapshot holds: every trained tensor, or with a disk tier those outside the blocks."""
        if self.engine is not None and self.engine.tier.durable:
            return [p for _, p in self.engine.outside]
        return self.trained

    def _sync(self) -> None:
        """The model's 16-bit trained tensors read their float32 masters (after a restore or a snapshot load)."""
        for masters in (self.masters, self._restored):
            if masters is not None:
                masters.sync()
        if self.engine is not None:
            self.engine.sync_outside()

    def restore(self, records: list[StepRecord], use_snapshots: bool = True) -> int:
        """Bring the weights to the end of `records`: the newest intact snapshot, then exact replay."""
        self.opt.skip(records)
        params = self._snapshot_params()
        if use_snapshots and keeps_state(self.opt):
            # snapshots hold weights, not momentum, moments or thresholds taken from the base weights
            self.log(f"{type(self.opt).__name__} keeps optimizer state: replaying every step from the base weights")
            use_snapshots = False
        # the disk tier's outside tensors: the engine's pairs (a 16-bit one's is its float32 master)
        indexed = list(self.engine.outside) if self.engine is not None else self.opt.indexed(params)
        if self.stream_cfg.tier == "cpu" and self.engine is None and Masters.needed(params):
            # A 16-bit model about to stream from host memory: its blocks train float32 masters, so the
            # snapshot and the replay land in float32 copies, which start the masters (start_streaming).
            self._restored = Masters(params)
            as_master = dict(zip(map(id, params), self._restored.values))
            indexed = [(i, as_master[id(p)]) for i, p in indexed]
            params = self._restored.values
        start, note = self.run.latest_snapshot(len(records), params) if use_snapshots else (0, None)
        if note:
            self.log(note)
        for rec in tqdm(records[start:], desc="replay", unit="step", leave=False, file=sys.stderr):
            self.opt.replay(rec, indexed)
        self.opt.last = records[-1] if records else None
        self._sync()
        if self.engine is not None:
            self.engine.restore(records)
            self.log(f"restored step {len(records)}: the blocks catch up from {self.engine.tier.folder} as they arrive")
            return len(records)
        self.log(f"restored step {len(records)}: " + (f"snapshot of step {start}, then " if start else "base weights, then ")
                 + f"{len(records) - start} steps replayed from the log")
        return len(records)

    def start_streaming(self) -> None:
        """The host-memory tier starts from the (restored) resident weights."""
        if self.stream_cfg.tier == "cpu" and self.engine is None:
            self.engine = stream_(self.model, self.stream_cfg, self.device, self.blocks_path, at_step=self.opt.steps,
                                  log=self.log)
            restored = None
            if self._restored is not None:  # the float32 values restore() reached, not their 16-bit roundings
                value = dict(zip(map(id, self._restored.compute), self._restored.values))
                restored = {i: value[id(p)] for i, p in self.opt.indexed(self._restored.compute)}
                self._restored = None
            self.engine.attach(self.opt, masters=restored)
        elif self.engine is not None and not self.engine.history and self.opt.steps == 0:
            self.engine.restore([])  # a new run on an existing folder: refuse blocks trained by another run

    def weights_digest(self) -> bytes:
        """A cheap fingerprint of the trained weights, for ranks to compare."""
        return weights_digest(self.engine.trained_values() if self.engine is not None else self.trained)

    def step(self, closure, share: float = 1.0) -> float:
        if self.engine is not None:
            return float(self.engine.step(self.opt, closure, share))
        if self.masters is None:
            return float(self.opt.step(closure, share))
        try:
            return float(self.opt.step(self.masters.probe(closure), share))
        finally:  # the model ends where the masters are: updated, or (a failed step) as before it
            self.masters.sync()

    def snapshot(self, step: int) -> None:
        if self.engine is not None and not self.engine.tier.durable:
            self.run.write_snapshot(step, self.engine.trained_values())
            return
        if self.engine is not None:
            self.engine.flush()  # the blocks on disk are the checkpoint of the blocks
        self.run.write_snapshot(step, self._snapshot_params())

    def load_snapshot(self, step: int) -> int:
        """Bring the (resident) weights back to `step`: its snapshot, or (a stateless method) the newest
        one before it and the log from there. Returns the step the weights are at (the last one when no
        snapshot at or before `step` can be read, nothing changed)."""
        params = self._snapshot_params()
        folder = self.run.path / "snapshots"
        if not any(int(f.stem[5:]) <= step for f in folder.glob("step-*.safetensors")):
            self.log(f"no snapshot at or before step {step}: keeping the last step instead")
            return self.opt.steps
        loaded, note = self.run.latest_snapshot(step, params)
        if note:
            self.log(note)
        if loaded != step and not keeps_state(self.opt):  # a stateful method replays only from the base
            indexed = self.opt.indexed(params)
            for rec in self.run.read_steps()[0][loaded:step]:
                self.opt.replay(rec, indexed)
            loaded = step
        self._sync()
        return loaded

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class _Best:
    """The best dev evaluation so far, and whether the run has run out of patience (`run.patience`)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.step: int | None = None
        self.score, self.loss = float("-inf"), float("inf")
        self.since = 0  # evaluations since the best one

    def record(self, step: int, score: float, loss: float) -> bool:
        """Count an evaluation; True when it is a new best: a higher metric, or the same with a lower
        loss (a small dev set ties often); otherwise the earlier step stays."""
        if (score, -loss) > (self.score, -self.loss):
            self.step, self.score, self.loss, self.since = step, score, loss, 0
            return True
        self.since += 1
        return False

    def out_of_patience(self) -> bool:
        return bool(self.patience) and self.since >= self.patience


def _replay_device(run_dir: Path, method_cfg: MethodConfig) -> str:
    """Where a run's steps can be redone: the CPU, or the kind of device its directions depend on."""
    try:
        base = json.loads((run_dir / "base.json").read_text())
    except (OSError, ValueError):
        return "cpu"  # Session says what is wrong with the folder
    if _directions_depend_on_device(method_cfg, base.get("directions", 1)):
        return base.get("device", "cpu").split(" ")[0]
    return "cpu"


def _directions_depend_on_device(method_cfg: MethodConfig, version: int) -> bool:
    distribution = method_cfg.options().get("distribution", "rademacher")
    return device_dependent(distribution, version) or \
        METHODS[method_cfg.name][1].directions_depend_on_device(method_cfg.options())


def _check_directions_device(base: dict, method_cfg: MethodConfig, device: torch.device) -> None:
    """Refuse to continue, replay or export a run on a device that draws its directions differently."""
    distribution = method_cfg.options().get("distribution", "rademacher")
    recorded, here = base.get("device", "cpu"), drawn_on(device)  # runs before the record was kept ran on the CPU
    if recorded != here and _directions_depend_on_device(method_cfg, base["directions"]):
        what = (f"{distribution} directions" if distribution == "gaussian" else
                "Rademacher directions of format 1" if base["directions"] == 1 else f"{method_cfg.name} directions")
        raise ConfigError(f"this run drew its {what} on {recorded}, which this process ({here}) draws differently; "
                          f"continue or evaluate it with run.device={recorded.split(' ')[0]} (--device) on the same kind of "
                          f"device (the default zosgd with Rademacher directions is the same on every device)")


def _folder_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        raise ConfigError(f"the stream folder {folder} has no tokenizer files; copy tokenizer.json and "
                          f"tokenizer_config.json of its model into it") from None


def train(cfgs: dict, log=print, resume: bool = False) -> dict:
    """Fine-tune with a ZO method and return the summary written to the run folder.

    `cfgs` maps section names to configs (`resolve_configs`); missing sections take their defaults.
    With `resume`, `run.out` is an existing run: its log is checked (a damaged tail is cut at the
    last good step), the weights are restored bit for bit, and training continues where it stopped.
    Under torchrun every rank calls this; rank 0 alone writes the run folder and prints.
    """
    cfgs = {name: cfgs.get(name) or cls() for name, cls in SECTIONS.items()}
    check_combinations(cfgs)  # again, for configs built in Python
    model_cfg, task_cfg, method_cfg, run_cfg = cfgs["model"], cfgs["task"], cfgs["method"], cfgs["run"]
    started = time.perf_counter()
    if run_cfg.threads:
        torch.set_num_threads(run_cfg.threads)
    device = resolve_device(run_cfg.device)
    group = Group.from_env(cfgs["parallel"], device)
    main = group is None or group.is_main
    if group is not None and not main:
        log = lambda *a, **k: None  # noqa: E731 -- rank 0 speaks for the run
    tf32 = set_tf32(device, model_cfg.tf32)
    if tf32:
        log(tf32)
    # Inputs are checked before the run folder exists, so a fixed command can reuse the same --out.
    resolve_source(model_cfg)
    task = make_task(task_cfg, None)  # its rows checked here; its tokenizer comes below
    if main:
        run = RunFolder(run_cfg.out, resume=resume)
        if resume:
            summary_path = run.path / "summary.json"
            done = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            if done.get("status") == "finished" and done.get("steps", 0) >= run_cfg.steps:
                run.close()
                raise ConfigError(f"run {run.path} already finished its {done['steps']} steps; "
                                  f"train longer with `zotune resume {run.path} run.steps=N`")
        else:
            run.write_config({name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()})
    if group is not None:  # the others follow rank 0's folder (same name even when it was a timestamp)
        out = group.broadcast(str(run.path) if main else None)
        if not main:
            run = FollowerRun(out)
    log(f"run folder: {run.path}" + (f" ({group.world} processes: data {group.dims.data} x perturb "
                                     f"{group.dims.perturb})" if group is not None else ""))

    try:
        session = Session(cfgs, run, device, log, resume, group)
        task.bind(session.tokenizer)
    except ConfigError:  # refused before step 0: a new run leaves nothing behind, a resumed one is as it was
        run.close() if resume else run.discard()
        raise
    if main:
        if resume:  # rewritten only now that the run continues (a longer run.steps, new defaults named)
            run.write_config({name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()})
        run.trackers = open_trackers(run_cfg.report_to, run.path, {name: dataclasses.asdict(cfg) for name, cfg in cfgs.items()})
    model, opt, params = session.model, session.opt, session.params
    if group is not None:  # the same model, config and seed on every rank, before any step
        group.check_same("the model, config and seed", text_digest(
            json.dumps({k: dataclasses.asdict(v) for k, v in cfgs.items() if k != "run"}, sort_keys=True, default=str)
            + str(run_cfg.seed) + weights_digest(session.params if session.engine is None else []).hex()))
    log(f"task: {task.describe()}, {len(task.train)} train / {len(task.dev)} dev / {len(task.test)} test")
    n_decay = sum(p.numel() for p in params if p.dim() >= 2)
    adapter = cfgs["adapter"]
    what = adapter.describe() if adapter.kind != "none" else model_cfg.trainable
    log(f"trainable ({what}): {len(params)} tensors, {sum(p.numel() for p in params):,} values "
        f"({n_decay:,} in tensors with dim >= 2, the only ones that get weight decay)")
    if session.masters is not None:
        dtype = params[0].dtype
        log(Precision.resolve(dtype, dtype, streamed=False).reason +
            f": {session.masters.extra_bytes / 2**20:,.0f} MiB more")
    elif session.engine is None and cfgs["stream"].tier == "none" and Masters.needed(params):
        log(f"warning: this run was started before float32 masters: its trainable tensors stay {model_cfg.dtype}, "
            f"as trained (in-place moves round them by up to {torch.finfo(params[0].dtype).eps:.0e} relative every "
            f"step and smaller updates are lost); start a new run to train float32 masters")
    streamed = cfgs["stream"].tier != "none" or session.engine is not None
    # (prefix tuning feeds every block trained keys and values: no block is frozen)
    prefix = None if streamed or not task.fixed_inputs or adapter.kind == "prefix" else \
        FrozenPrefix.for_params(model, params, model_cfg.blocks_path, keep_bytes=run_cfg.prefix_cache_mb << 20)
    if prefix is not None:
        log(f"blocks 0..{prefix.k - 1} are frozen: computed once per batch (kept up to {run_cfg.prefix_cache_mb} MiB "
            f"across epochs) and reused by every probe")

    track_dev = bool(run_cfg.eval_every and task.dev)
    is_eval_step = lambda s: track_dev and s % run_cfg.eval_every == 0 and s < run_cfg.steps  # noqa: E731

    best = _Best(run_cfg.patience)

    def log_dev(step: int) -> float:
        dev = evaluate(model, task, task.dev, run_cfg.eval_batch_size, device, "dev", group)
        run.log({"step": step, **_metric_record("dev", dev)})
        if best.record(step, dev[dev["metric"]], dev["loss"]) and run_cfg.keep == "best":
            run.protected = step  # its snapshot stays: the weights the run ends with, if nothing beats it
            session.snapshot(step)
        return dev[dev["metric"]]

    start, before, seconds_before = 0, None, 0.0
    if resume:
        records, problem = run.read_steps(repair=True)
        if problem:
            log(problem)
        start = session.restore(records)
        before, seconds_before = run.rewind_metrics(records, keep_dev=is_eval_step)
    session.start_streaming()
    if resume:  # the dev evaluations so far decide the best step and the patience left
        for dev_step, score, loss in run.dev_scores() if main else []:
            best.record(dev_step, score, loss)
        run.protected = best.step if run_cfg.keep == "best" and best.step is not None else -1
    if group is not None:  # decisions from rank 0's files: every rank must take part in the same evaluations
        before, seconds_before, best = group.broadcast((before, seconds_before, best))
    if before is None:
        before = evaluate(model, task, task.test, run_cfg.eval_batch_size, device, "zero-shot test", group)
        run.log({"step": 0, **_metric_record("test", before), "n": before["n"]})
    metric = before.get("metric", "accuracy")
    log(f"zero-shot test {metric} {before[metric]:.3f} (loss {before['loss']:.4f})")
    if track_dev:  # a run can stop between a step and its evaluation: evaluate what is missing
        last_eval = start - start % run_cfg.eval_every
        if last_eval and not is_eval_step(last_eval):
            last_eval -= run_cfg.eval_every
        missing = not run.has_dev(last_eval)
        if group is not None:
            missing = group.broadcast(missing)
        if missing:
            log_dev(last_eval)

    order = _batches(len(task.train), run_cfg.batch_size, run_cfg.seed,
                     task.lengths(task.train) if run_cfg.group_by_length else None)
    for _ in range(start):  # the data order of the steps already taken
        next(order)
    collated: dict[int, object] = {}
    base_lrs = [g["lr"] for g in opt.param_groups]  # the schedule scales each group's own lr
    status, error, step, stopped_early = "finished", None, start, None
    train_started = time.perf_counter()
    bar = tqdm(total=run_cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not main)
    with _StopOnCtrlC() as ctrl_c:
        for step in range(start + 1, run_cfg.steps + 1):
            batch_id, indices = next(order)
            rows, share = group.rows(len(indices)) if group is not None else (slice(None), 1.0)  # this rank's part
            if batch_id not in collated and share:  # kept on the host: device memory does not grow with the data
                collated[batch_id] = task.collate([task.train[i] for i in indices[rows]])
            batch = collated[batch_id].to(device) if share else None
            factor = lr_factor(run_cfg.lr_schedule, step, run_cfg.steps, run_cfg.warmup_steps)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * factor  # recorded with the step: replay never recomputes it
            if prefix is not None and share:
                prefix.capture(lambda: task.forward(model, batch), key=batch_id)
            replay = prefix.replaying if prefix is not None else contextlib.nullcontext
            try:
                with replay(), task.head(model, batch) if share else contextlib.nullcontext():
                    loss = session.step(lambda: task.head_loss(model, batch), share)  # the head: once for every probe
            except (NonFiniteLossError, DivergedError) as e:
                status, error = "failed", str(e)
                step -= 1
                break
            rec = opt.last
            try:
                run.append_step(step, rec, loss)  # the checkpoint: from here on, this step is never lost
                run.log({"step": step, "loss": loss, "grads": rec.grads, "seed": rec.seed, "lr": rec.lrs[0],
                         "seconds": round(seconds_before + time.perf_counter() - train_started, 3)})
                if is_eval_step(step):
                    score = log_dev(step)
                    if main:
                        bar.write(f"step {step}: dev {task_cfg.metric} {score:.3f}")
                    if best.out_of_patience():
                        status, stopped_early = "finished", step
                        if run_cfg.snapshot_every and step % run_cfg.snapshot_every:
                            session.snapshot(step)
                        break
                if run_cfg.snapshot_every and step % run_cfg.snapshot_every == 0:
                    session.snapshot(step)
                if group is not None and group.dims.check_every and step % group.dims.check_every == 0:
                    group.check_same(f"the weights at step {step}", session.weights_digest())
            except OSError as e:
                why = "the disk is full" if is_disk_full(e) else e.strerror
                status, error = "failed", (f"step {step}: could not write to the run folder ({why}); everything logged "
                                           f"so far is intact: free space, then `zotune resume {run.path}`")
                break
            except DivergedError as e:
                status, error = "failed", f"step {step}: {e}; the run folder is intact: `zotune resume {run.path}`"
                break
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update()
            stop = ctrl_c.requested
            if group is not None:  # every rank stops after the same step
                try:
                    stop = group.sum([float(stop)])[0] > 0
                except DivergedError as e:
                    status, error = "failed", f"step {step}: {e}; the run folder is intact: `zotune resume {run.path}`"
                    break
            if stop:
                status = "interrupted"
                break
    bar.close()
    if prefix is not None:
        prefix.clear()
    train_seconds = time.perf_counter() - train_started

    summary = {"status": status, "steps": step, "before": before, "train_seconds": round(train_seconds, 1),
               "run": str(run.path)}
    if stopped_early is not None:
        summary["stopped_early"] = {"step": stopped_early, "patience": run_cfg.patience}
        log(f"stopped early at step {stopped_early}: {run_cfg.patience} dev evaluations without a better "
            f"{task_cfg.metric} than step {best.step}'s {best.score:.3f}")
    if status == "finished":
        if track_dev and stopped_early is None:
            log_dev(step)
        if run_cfg.snapshot_every and step % run_cfg.snapshot_every and stopped_early is None:
            session.snapshot(step)
        kept = step
        if run_cfg.keep == "best" and best.step is not None and best.step != step:
            kept = session.load_snapshot(best.step)  # the weights of the best dev evaluation
            log(f"keeping step {kept} (best dev {task_cfg.metric} {best.score:.3f}) of {step}")
        if best.step is not None:
            summary["best"] = {"step": best.step, f"dev_{task_cfg.metric}": best.score, "kept": run_cfg.keep == "best"}
        after = evaluate(model, task, task.test, run_cfg.eval_batch_size, device, "fine-tuned test")
        summary["after"] = after
        summary["kept_step"] = kept
        run.log({"step": kept, **_metric_record("test", after), "n": after["n"]})
    else:
        summary["error"] = error or "stopped by Ctrl-C"
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["forward_passes"] = step * method_cfg.forwards_per_step
    session.close()  # streaming: every block flushed to its tier
    try:
        run.write_summary(summary)
        run.plot()
    except OSError as e:
        log(f"could not write the summary or plot ({e.strerror}); metrics.jsonl and steps.log are intact")
    run.close()
    _print_table(summary, log)
    if group is not None:
        import torch.distributed as dist
        dist.destroy_process_group()
    return summary


def rebuild(run_dir: str, out: str, use_snapshots: bool, log=print) -> Path:
    """Write the run's fine-tuned model as a standard HF folder (base + snapshot + log, or log alone)."""
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise ConfigError(f"output folder {out} is not empty; pass a new --out")
    run = RunFolder(run_dir, resume=True)
    try:
        cfgs = resolve_configs(run.path / "config.yaml", run_folder=True)
        session = Session(cfgs, run, resolve_device(_replay_device(run.path, cfgs["method"])), log)
        records, problem = run.read_steps()
        if problem:
            log(problem)
        records = kept_records(run, cfgs, records, log)
        session.restore(records, use_snapshots=use_snapshots)
        if session.engine is not None and session.engine.tier.durable:
            if cfgs["adapter"].kind == "none":  # block by block: a model larger than RAM exports
                export_streamed(session.model, session.engine, out_path, log)
            else:  # PEFT writes the adapter alone (on this tier its tensors live outside the blocks)
                session.model.save_pretrained(out_path)
            session.close()
        else:
            if session.engine is not None:
                unstream_(session.model, session.engine)
            dequantize_(session.model)  # a quantized base: standard linears holding q x the trained scales
            session.model.save_pretrained(out_path)
    finally:
        run.close()
    session.tokenizer.save_pretrained(out_path)
    log(f"wrote {out_path} (step {len(records)}): load it with AutoModelForCausalLM.from_pretrained")
    return out_path


def kept_records(run: RunFolder, cfgs: dict, records: list[StepRecord], log) -> list[StepRecord]:
    """The steps whose weights a run kept: all of them, or with `run.keep=best` those up to its best step."""
    best = run.best_step() if cfgs["run"].keep == "best" else None
    if best is None or best >= len(records):
        return records
    log(f"run.keep=best: the weights of step {best} (the best dev evaluation) of {len(records)}")
    return records[:best]


def _print_table(summary: dict, log) -> None:
    before, after = summary["before"], summary.get("after")
    metric = before.get("metric", "accuracy")
    log("")
    log(f"{'':14}{metric:>12}{'loss':>10}")
    log(f"{'zero-shot':14}{before[metric]:>12.3f}{before['loss']:>10.4f}")
    if after:
        log(f"{'fine-tuned':14}{after[metric]:>12.3f}{after['loss']:>10.4f}")
        log(f"{'change':14}{after[metric] - before[metric]:>+12.3f}{after['loss'] - before['loss']:>+10.4f}")
    log(f"{summary['steps']} steps in {summary['train_seconds']:.0f}s of training, {summary['seconds']:.0f}s in all; "
        f"status {summary['status']}; run folder {summary['run']}")
    if summary.get("kept_step") not in (None, summary["steps"]):
        log(f"fine-tuned = the weights of step {summary['kept_step']} (run.keep=best)")
    if summary.get("error"):
        log(f"stopped: {summary['error']}")
