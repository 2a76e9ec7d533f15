"""A run's trained weights from its folder: the weights it kept (`kept_records`), opened for evaluation,
or written out as a standard HF folder (`rebuild`: `zotune export` and `zotune replay`)."""

from __future__ import annotations

from pathlib import Path

from zotune.files import check_new_folder
from zotune.methods import StepRecord
from zotune.quant import dequantize_
from zotune.resolve import check_as_recorded, resolve_configs, resolve_device
from zotune.runs import RunFolder, RunRecord
from zotune.session import Session, replay_device
from zotune.sparse_delta import merge_deltas_
from zotune.stream import export_streamed, unstream_


def open_run_weights(run: RunRecord, cfgs: dict, device, log, use_snapshots: bool = True,
                     also_free: tuple[str, ...] = ()) -> tuple[Session, list[StepRecord]]:
    """(a Session at the weights the run kept, the records of its steps up to them). `also_free`: sections
    the caller may set otherwise than the run recorded them (an evaluation's own task)."""
    check_as_recorded(run.recorded_options(), cfgs, run.path, also_free)
    records, problem = run.read_steps()
    if problem:
        log(problem)
    records = kept_records(run, cfgs, records, log)
    session = Session(cfgs, run, device, log)
    session.restore(records, use_snapshots=use_snapshots)
    return session, records


def rebuild(run_dir: str, out: str, use_snapshots: bool, log=print) -> Path:
    """Write the run's fine-tuned model as a standard HF folder (base + snapshot + log, or log alone)."""
    out_path = Path(out)
    check_new_folder(out_path, "--out")
    run = RunFolder(run_dir, resume=True)
    try:
        cfgs = resolve_configs(run.path / "config.yaml", run_folder=True)
        device = resolve_device(replay_device(run.path, cfgs["method"]))
        session, records = open_run_weights(run, cfgs, device, log, use_snapshots)
        if session.engine is not None and session.engine.tier.durable:
            if cfgs["adapter"].kind in ("none", "tt"):  # block by block (deltas merged): larger than RAM exports
                export_streamed(session.model, session.engine, out_path, log)
            else:  # PEFT writes the adapter alone (on this tier its tensors live outside the blocks)
                session.model.save_pretrained(out_path)
            session.close()
        else:
            if session.engine is not None:
                unstream_(session.model, session.engine)
            merge_deltas_(session.model)  # sensitive sparse ZO: each trained delta folded into a float linear
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
