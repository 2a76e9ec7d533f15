"""Which settings do not go together, in one table, checked when the configuration is resolved.

Each rule is a condition on the resolved sections (model, adapter, task, method, run, stream,
parallel) and the sentence that says why and what to do. `check(cfgs)` runs them all before a
model is loaded or anything is written (a run folder, a stream folder), so a refused combination
costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zotune.config import ConfigError
from zotune.methods import METHODS, not_a_walk
from zotune.stream import is_stream_folder


@dataclass(frozen=True)
class Rule:
    name: str
    applies: Callable[[dict], bool]  # True when the combination is refused
    reason: Callable[[dict], str]  # one sentence: what is wrong and the fix


def _streamed(c: dict) -> bool:
    return c["stream"].tier != "none" or _is_folder(c["model"].name)


def _on_disk(c: dict) -> bool:
    return c["stream"].tier == "disk" or _is_folder(c["model"].name)


def _method_class(c: dict):
    return METHODS[c["method"].name][1]


def _unstreamable(c: dict) -> str | None:
    return not_a_walk(_method_class(c), "streamed", "stream any other method, or train it resident (no --offload)")


RULES = [
    Rule("unstreamable method",
         lambda c: _streamed(c) and bool(_unstreamable(c)),
         lambda c: _unstreamable(c)),
    Rule("a one-process method in several processes",
         lambda c: _method_class(c).one_process is not None and c["parallel"].data * c["parallel"].perturb > 1,
         lambda c: _method_class(c).one_process),
    Rule("quantized base with an adapter",
         lambda c: c["model"].quantize != "none" and c["adapter"].kind != "none",
         lambda c: f"model.quantize={c['model'].quantize} with adapter.kind={c['adapter'].kind} is not supported "
                   f"yet; drop one of them"),
    Rule("quantizing a stream folder",
         lambda c: c["model"].quantize != "none" and _is_folder(c["model"].name),
         lambda c: f"{c['model'].name} is a stream folder: its blocks stay as they were written; drop "
                   f"model.quantize (a folder written by a quantized run is quantized already), or quantize the "
                   f"original model"),
    Rule("storage dtype without a tier",
         lambda c: c["stream"].storage_dtype is not None and c["stream"].tier == "none",
         lambda c: f"stream.storage_dtype={c['stream'].storage_dtype} sets how streamed blocks are stored: add "
                   f"--offload cpu or --offload disk, or set model.dtype for a resident model"),
    Rule("best weights or early stopping without dev evaluations",
         lambda c: (c["run"].keep == "best" or c["run"].patience) and not (c["run"].eval_every and _has_dev(c)),
         lambda c: f"{_dev_decider(c)} decides on dev evaluations: set run.eval_every (e.g. 100) and task.n_dev >= 1"),
    Rule("best weights on the disk tier",
         lambda c: c["run"].keep == "best" and _on_disk(c),
         lambda c: "run.keep=best is not yet available with --offload disk (the blocks are trained in place, so the "
                   "base is gone); use run.keep=last, --offload cpu, or train resident"),
    Rule("a sensitivity mask with an adapter",
         lambda c: c["adapter"].kind != "none" and "sensitive:" in str(c["model"].trainable),
         lambda c: f"model.trainable=sensitive:MASK trains entries of the base's own linears; adapter.kind="
                   f"{c['adapter'].kind} trains an adapter instead: drop one of them"),
    Rule("stream folder with the RAM tier",
         lambda c: c["stream"].tier == "cpu" and _is_folder(c["model"].name),
         lambda c: f"{c['model'].name} is a stream folder (disk tier); drop stream.tier=cpu to train from it"),
]


def _dev_decider(c: dict) -> str:
    return "run.keep=best" if c["run"].keep == "best" else f"run.patience={c['run'].patience}"


def _has_dev(c: dict) -> bool:
    return bool(c["task"].dev or c["task"].n_dev)


def _is_folder(name: str) -> bool:
    return is_stream_folder(name)


def settle_keep(cfgs: dict) -> None:
    """`run.keep=auto` as what this run can keep: its best dev step (zero-shot included, so the model it
    hands back is never worse on dev than the one it started from) when it evaluates dev and its base stays
    (resident, or host-memory streaming), else its last step. Settled before the run records its options,
    so a resume keeps the same."""
    run = cfgs["run"]
    if run.keep == "auto":
        run.keep = "best" if run.eval_every and _has_dev(cfgs) and not _on_disk(cfgs) else "last"


def check(cfgs: dict) -> None:
    """Raise ConfigError with the first rule the resolved configuration breaks (`run.keep=auto` settled first)."""
    settle_keep(cfgs)
    for rule in RULES:
        if rule.applies(cfgs):
            raise ConfigError(rule.reason(cfgs))
