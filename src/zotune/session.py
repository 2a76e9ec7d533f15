"""A run's model, trainable tensors and optimizer, built for a new or an existing run (`Session`).

The builder of `zotune train`, `resume`, `eval` and `export`: it loads (or opens a stream folder),
quantizes, adapts, records the base, makes the masters and the optimizer, starts streaming, and
brings the weights to any logged step (snapshot, then exact replay).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zotune.adapters import AdapterConfig, apply_adapter
from zotune.config import ConfigError
from zotune.files import entries, remove_new_entries, tensor_digest, weights_identity
from zotune.methods import METHODS, MethodConfig, StepRecord, make_optimizer
from zotune.methods.perturb import FORMAT as DIRECTIONS_FORMAT
from zotune.methods.perturb import device_dependent, drawn_on
from zotune.models import (
    ModelConfig,
    load_model,
    mask_paths,
    parse_trainable,
    resolve_source,
    select_trainable,
    trainable_forms,
    without_masks,
)
from zotune.parallel import SOLO, Group, weights_digest
from zotune.precision import Masters
from zotune.quant import QWEIGHT_KIND, quantize_
from zotune.resolve import recorded_options
from zotune.runs import RunFolder
from zotune.sparse_delta import attach_deltas
from zotune.stream import StreamConfig, folder_tokenizer, is_stream_folder, keeps_state, load_streamed, stream_
from zotune.stream.format import record_source, recorded_source


class Session:
    """A loaded model, its trainable tensors and its optimizer, for a new or an existing run.

    With streaming, the blocks live on a tier and `step` visits each once (`zotune.stream`). A disk
    tier is itself the checkpoint of the blocks: the run's snapshots then hold only the trainable
    tensors outside the blocks, and on resume each block catches up from its own recorded step.
    """

    def __init__(self, cfgs: dict, run: RunFolder, device, log, resume: bool = False, group: Group = SOLO):
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

    def _open(self, cfgs: dict, run: RunFolder, device, log, resume: bool, group: Group) -> None:
        self.run, self.log, self.device = run, log, device
        model_cfg, method_cfg = cfgs["model"], cfgs["method"]
        self.stream_cfg: StreamConfig = cfgs.get("stream") or StreamConfig()
        self.blocks_path = model_cfg.blocks_path
        self.engine = None
        folder = model_cfg.name if is_stream_folder(model_cfg.name) else (
            self.stream_cfg.dir if self.stream_cfg.tier == "disk" and is_stream_folder(self.stream_cfg.dir) else None)
        if folder and folder != model_cfg.name:  # --offload-dir of an existing folder: it must be this model's
            _check_folder_source(folder, model_cfg, resume)
        if folder:  # blocks already on disk: load only what lies outside them
            self.model, self.engine = load_streamed(folder, device, model_cfg.dtype, self.stream_cfg.prefetch,
                                                    group, log)
            quantized = any(s.dtype in QWEIGHT_KIND for specs in self.engine.tier.specs for s in specs)
            if model_cfg.quantize != "none" and not quantized:
                raise ConfigError(f"the stream folder {folder} holds float blocks, but "
                                  f"model.quantize={model_cfg.quantize}; drop model.quantize, or give a new "
                                  f"--offload-dir to write quantized blocks")
            self.tokenizer = folder_tokenizer(folder)
            base_hash = self.engine.tier.manifest["base_digest"]
        else:
            if resume and self.stream_cfg.tier == "disk" and run.read_steps()[0]:
                raise ConfigError(f"the stream folder {self.stream_cfg.dir} of this run is missing: its blocks are the "
                                  f"run's weights; restore the folder, or start a new run")
            # Loaded on the CPU. Resident, the model goes to the device once it is complete (quantized,
            # adapted) below; with a tier, only what lies outside the blocks ever does (stream_).
            writer = group.is_main  # one writer of a disk tier; the other ranks then open it
            if self.stream_cfg.tier != "disk" or writer:
                self.model, self.tokenizer = load_model(model_cfg, log=log)
            if self.stream_cfg.tier == "disk":  # a new disk tier from the loaded model, before anything trains
                if writer:  # the folder holds the (quantized) base; a mask's deltas are attached on loading it
                    self._quantize(model_cfg, log, attach=False)
                    rest = without_masks(model_cfg.trainable)
                    if (cfgs.get("adapter") or AdapterConfig()).kind == "none" and rest:
                        select_trainable(self.model, rest, self.blocks_path)  # refused before the folder is written
                    self._new_folder = (Path(self.stream_cfg.dir), entries(Path(self.stream_cfg.dir)))
                    self.engine = stream_(self.model, self.stream_cfg, device, self.blocks_path, log=log)
                    self.tokenizer.save_pretrained(self.stream_cfg.dir)  # the folder is a complete model source
                    record_source(Path(self.stream_cfg.dir), model_cfg.name,
                                  weights_identity(*resolve_source(model_cfg)))
                group.barrier()  # the folder is written: the other ranks open it
                if writer:
                    self.engine.join(group)
                else:
                    self.model, self.engine = load_streamed(self.stream_cfg.dir, device, model_cfg.dtype,
                                                            self.stream_cfg.prefetch, group, log)
                    self.tokenizer = folder_tokenizer(self.stream_cfg.dir)
                base_hash = self.engine.tier.manifest["base_digest"]
            else:
                base_hash = tensor_digest(self.model.state_dict().values())
        base = run.write_base({"model": model_cfg.name, "source": folder or "/".join(
            str(x) for x in resolve_source(model_cfg) if x), "hash": base_hash, "directions": DIRECTIONS_FORMAT,
            "device": drawn_on(device), "float32_masters": True, "options": recorded_options(cfgs)})
        _check_directions_device(base, method_cfg, device)
        adapter = cfgs.get("adapter") or AdapterConfig()
        if self.engine is None:  # (a disk tier's blocks were quantized before they were written)
            self._quantize(model_cfg, log)
        else:  # a mask's deltas on the disk tier's base: on the device, outside its blocks (as an adapter's)
            self._attach_masks(model_cfg, log)
        self.model, named = apply_adapter(self.model, adapter, cfgs["run"].seed, model_cfg.blocks_path)
        if self.stream_cfg.tier == "none" and self.engine is None:
            self.model.to(device)
        forms = [("adapter", "adapter", named)] if named else \
            trainable_forms(self.model, model_cfg.trainable, model_cfg.blocks_path)
        self.params = [p for _, _, pairs in forms for _, p in pairs]
        # A resident 16-bit model trains float32 masters of its trained tensors (zotune.precision); runs
        # started before masters existed resume as they were trained.
        resident = self.stream_cfg.tier == "none" and self.engine is None
        self.masters = Masters(self.params) if resident and base["float32_masters"] and Masters.needed(self.params) \
            else None
        self.opt = make_optimizer(method_cfg.name, lr_groups(forms, self.trained, method_cfg, model_cfg.trainable, log),
                                  seed=cfgs["run"].seed, group=group, directions_format=base["directions"],
                                  config=method_cfg)
        self._base_lrs = [g["lr"] for g in self.opt.param_groups]  # the schedule scales each group's own lr
        if self.engine is not None:
            self.engine.device_blocks = self.stream_cfg.device_blocks or self.engine.device_blocks
            self.engine.attach(self.opt)

    def _quantize(self, model_cfg: ModelConfig, log, attach: bool = True) -> None:
        """A quantized base (model.quantize): every frozen block linear quantized; what trains stays float.
        A sensitivity mask's sparse deltas are attached first (unless `attach` is False: a disk tier's folder
        holds the base alone): the linears they wrap are frozen, and quantized."""
        if attach:
            self._attach_masks(model_cfg, log)
        if model_cfg.quantize == "none":
            return
        spec = model_cfg.trainable if attach else without_masks(model_cfg.trainable)
        only_scales = not spec or all(kind == "scales" for kind, _ in parse_trainable(spec))
        keep = set() if only_scales else {id(p) for _, p in select_trainable(self.model, spec, model_cfg.blocks_path)}
        quantize_(self.model, model_cfg.quantize, keep, model_cfg.blocks_path, log)

    def _attach_masks(self, model_cfg: ModelConfig, log) -> None:
        for mask in mask_paths(model_cfg.trainable):
            entries = attach_deltas(self.model, mask)
            log(f"sensitive sparse ZO: {entries:,} entries of the mask {mask} train, as a delta on a frozen base")

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
        origin = f"snapshot of step {start}, then " if start else "base weights, then "
        self.log(f"restored step {len(records)}: {origin}{len(records) - start} steps replayed from the log")
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

    def step(self, closure, share: float = 1.0, lr_factor: float = 1.0) -> tuple[float, StepRecord]:
        """One step at `lr_factor` x each group's own lr (the schedule's); (mean probe loss, its record)."""
        for g, lr in zip(self.opt.param_groups, self._base_lrs):
            g["lr"] = lr * lr_factor  # recorded with the step: replay never recomputes it
        return self._step(closure, share), self.opt.last

    def _step(self, closure, share: float) -> float:
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


def back_to_step(session: Session, step: int, cfgs: dict, run: RunFolder, device, group: Group) -> tuple[Session, int]:
    """(a session at the weights of an earlier `step` of this run, the step they are at). Resident, the
    session loads that step's snapshot in place; on the host-memory tier, whose blocks hold the last
    step, the run is rebuilt from its base and its log up to `step`, after the tier's memory is freed."""
    if session.engine is None:
        return session, session.load_snapshot(step)
    session.close()
    session.model = session.engine = session.opt = None  # (the tier's blocks go before the base loads again)
    gc.collect()
    rebuilt = Session(cfgs, run, device, lambda *a, **k: None, resume=True, group=group)
    rebuilt.restore(run.read_steps()[0][:step])
    rebuilt.start_streaming()
    return rebuilt, step


def replay_device(run_dir: Path, method_cfg: MethodConfig) -> str:
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
                          f"continue or evaluate it with run.device={recorded.split(' ')[0]} "
                          f"(--device) on the same kind of device (the default zosgd with Rademacher directions is "
                          f"the same on every device)")


def _check_folder_source(folder: str, model_cfg: ModelConfig, resume: bool) -> None:
    """Refuse a stream folder written from another model than --model (its blocks would train silently in
    place of the model asked for)."""
    source = recorded_source(Path(folder))
    if source is None:
        if resume:
            return  # the run's own folder, from before sources were recorded (base.json identifies the base)
        raise ConfigError(f"the stream folder {folder} does not record which model it was written from, so it cannot "
                          f"be checked against --model {model_cfg.name}; train from it with --model {folder} (a "
                          f"stream folder is a complete model source), or give a new --offload-dir")
    if source["identity"] != weights_identity(*resolve_source(model_cfg)):
        raise ConfigError(f"the stream folder {folder} holds the blocks of {source['model']}, not of --model "
                          f"{model_cfg.name} (their weight files differ); give a new --offload-dir for this model, "
                          f"or train from the folder itself with --model {folder}")


def lr_groups(forms, trained: list[torch.Tensor], method_cfg: MethodConfig, spec: str, log=print) -> list:
    """The optimizer's parameters: `trained` as one group at method.lr, or with `method.lr_scale` one group
    per run of forms (`trainable_forms`) at the same factor, in order, so direction seeds stay as they were."""
    scale = method_cfg.lr_scale
    if not scale:
        return trained
    if forms[0][1] == "adapter":
        raise ConfigError("method.lr_scale scales forms of model.trainable, and an adapter trains its own tensors "
                          "instead; drop method.lr_scale")
    names = {name for part, kind, _ in forms for name in (part, kind)}
    unknown = sorted(set(scale) - names)
    if unknown:
        raise ConfigError(f"method.lr_scale names {unknown[0]!r}, not a form of model.trainable={spec!r}; name one "
                          f"of: {', '.join(sorted(names))}")
    groups, at = [], 0
    for part, kind, pairs in forms:
        factor = scale.get(part, scale.get(kind, 1.0))
        if groups and groups[-1]["factor"] == factor:
            groups[-1]["params"] += trained[at: at + len(pairs)]
        elif pairs:
            groups.append({"params": trained[at: at + len(pairs)], "factor": factor})
        at += len(pairs)
    log("lr by form (method.lr_scale): " + ", ".join(f"{form} {method_cfg.lr * f:g}" for form, f in scale.items()) +
        f"; the other forms {method_cfg.lr:g}")
    return [{"params": g["params"], "lr": method_cfg.lr * g["factor"]} for g in groups]
