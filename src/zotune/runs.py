"""The run folder: the checkpoint (base reference, step log, snapshots) and the human-facing files.

- `base.json`: the base model's name and content hash (a different base is refused on resume), and
  the format of the perturbation directions the log was drawn with.
- `steps.log`: the checkpoint. A format header, then one binary record per step, appended and flushed
  as the step ends, each with its own CRC32: step, seed, projected gradient(s), each parameter
  group's lr, mean probe loss (42 bytes for one direction and one group: 20,000 steps in 840 KB).
  Base weights + this log = the fine-tuned weights, bit for bit.
- `snapshots/step-NNNNNNN.safetensors`: the trainable tensors every `run.snapshot_every` steps (the
  last two kept), with a content digest, so that resuming replays at most that many steps.
- `config.yaml`, `metrics.jsonl`, `summary.json`, `curve.png`: for people and plots.
- `lock`: held (flock) by the one process writing the run; the kernel releases it if that dies.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from zotune.config import ConfigError
from zotune.files import check_new_folder, entries, remove_new_entries, try_lock
from zotune.methods import StepRecord
from zotune.report import headline, plot
from zotune.snapshots import load_latest, save
from zotune.steplog import LOG_MAGIC, decode_steps, encode_step, log_format


class RunRecord:
    """A run folder read by a process that does not write it: a rank other than 0 (which follows rank
    0's folder), or `zotune eval` of a run that may be training. Its writes do nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.trackers: list = []  # zotune.trackers: copies of the metrics, when run.report_to asks
        self.protected = -1  # the step of a snapshot never removed (the best one, with run.keep=best)

    def _metric_rows(self) -> list[dict[str, Any]]:
        rows = []
        for line in (self.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return rows

    def has_dev(self, step: int) -> bool:
        return any(r.get("step") == step and headline(r, "dev") for r in self._metric_rows())

    def _recorded_base(self, base: dict[str, Any]) -> dict[str, Any] | None:
        """base.json as written when the run started (None for a new run), checked against `base`."""
        path = self.path / "base.json"
        if not path.exists():
            return None
        try:
            recorded = json.loads(path.read_text())
            recorded["hash"], recorded["model"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path} is damaged; restore it from a copy of the run, or start a new run") from None
        if recorded["hash"] != base["hash"]:
            raise ConfigError(
                f"the base model {base['model']} (hash {base['hash'][:16]}) is not the one this run started from "
                f"({recorded['model']}, hash {recorded['hash'][:16]}); use the original base model")
        return {"directions": 1, "float32_masters": False, **recorded}

    def recorded_options(self) -> dict | None:
        """Every option as the run recorded it when it started (base.json), or None (a new run, a run started
        before records were kept; a damaged base.json is reported when the base is checked)."""
        try:
            return json.loads((self.path / "base.json").read_text()).get("options")
        except (OSError, ValueError, AttributeError):
            return None

    def read_steps(self, repair: bool = False) -> tuple[list[StepRecord], str | None]:
        """The valid records and, when the log is damaged, a sentence saying where (`repair`: see RunFolder)."""
        records, _, problem = decode_steps((self.path / "steps.log").read_bytes())
        return records, problem

    def best_step(self) -> int | None:
        """The step whose weights a `run.keep=best` run kept (summary.json), or None."""
        try:
            return json.loads((self.path / "summary.json").read_text()).get("best", {}).get("step")
        except (OSError, ValueError, AttributeError):
            return None

    def dev_scores(self) -> list[tuple[int, float, float]]:
        """(step, headline dev metric, dev loss) of every dev evaluation in metrics.jsonl, in order."""
        return [(r["step"], headline(r, "dev")[1], r.get("dev_loss", float("inf"))) for r in self._metric_rows()
                if headline(r, "dev")]

    def latest_snapshot(self, max_step: int, params: list[torch.Tensor]) -> tuple[int, str | None]:
        """Load the newest intact snapshot at or before `max_step` into `params`; (its step, a note)."""
        return load_latest(self.path / "snapshots", max_step, params)

    # -- what the writer does (a reader leaves it to the writer) ----------------------------------

    def write_config(self, sections: dict[str, Any]) -> None:
        pass

    def write_trial(self, trial: dict[str, Any]) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass

    def rewind_metrics(self, records: list[StepRecord], keep_dev) -> tuple[dict | None, float]:
        return None, 0.0  # the writer decides, and rank 0 broadcasts

    def write_base(self, base: dict[str, Any]) -> dict[str, Any]:
        return self._recorded_base(base) or base  # checked, never written

    def append_step(self, step: int, record: StepRecord, loss: float) -> None:
        pass

    def write_snapshot(self, step: int, params: list[torch.Tensor], keep: int = 2) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def plot(self) -> Path:
        return self.path / "curve.png"

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


class RunFolder(RunRecord):
    """One run's folder, written by this process. Every write is flushed as it happens, so a killed run
    keeps what it logged."""

    def __init__(self, path: str | Path | None, resume: bool = False):
        super().__init__(path or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if resume:
            if not (self.path / "config.yaml").is_file():
                raise ConfigError(f"{self.path} is not a zotune run folder (no config.yaml); pass the folder of a run")
        else:
            self.check_new(self.path)
        # What was here before: a run refused during its setup takes away only what it wrote (`discard`).
        self._existed = entries(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = (self.path / "lock").open("a+")
        except OSError as e:
            raise ConfigError(f"cannot write the run folder {self.path} ({e.strerror}); pass a writable "
                              f"--out") from None
        if not try_lock(self._lock):
            self._lock.seek(0)
            owner = self._lock.read().strip() or "another process"
            raise ConfigError(f"run folder {self.path} is in use by {owner}; wait for it to end or pass another "
                              f"--out") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}\n")
        self._lock.flush()
        self._metrics = (self.path / "metrics.jsonl").open("a", encoding="utf-8")
        self._steps = (self.path / "steps.log").open("ab")
        with (self.path / "steps.log").open("rb") as f:
            self._log_format = log_format(f.read(len(LOG_MAGIC)))  # a log keeps the format it started in
        if self._log_format == 2 and self._steps.tell() == 0:
            self._steps.write(LOG_MAGIC)
            self._steps.flush()

    @staticmethod
    def check_new(path: Path) -> None:
        """Refuse `path` for a new run unless it is new, empty, or a run folder of ours that never started."""
        if (path / "summary.json").exists() or any(  # (a steps.log of only its magic holds no step)
                (path / name).is_file() and (path / name).stat().st_size > empty
                for name, empty in (("steps.log", len(LOG_MAGIC)), ("metrics.jsonl", 0))):
            raise ConfigError(f"run folder {path} already holds a run; pass another --out, or `zotune resume {path}`")
        check_new_folder(path, "--out", own=_never_started)

    def write_config(self, sections: dict[str, Any]) -> None:
        import yaml

        self._atomic_write("config.yaml", yaml.safe_dump(sections, sort_keys=False))

    def write_trial(self, trial: dict[str, Any]) -> None:
        """trial.json: the candidates `model.trainable=auto` tried, their dev scores and cost, and its choice;
        under `lr_search`, the lrs `method.lr=auto` tried, their training losses, and its choice."""
        self._atomic_write("trial.json", json.dumps(trial, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)
        self._metrics.flush()

    def rewind_metrics(self, records: list[StepRecord], keep_dev) -> tuple[dict | None, float]:
        """Make metrics.jsonl say what an uninterrupted run says at the end of `records`.

        Keeps the zero-shot result, the step lines of the log's steps (writing any the kill cut
        off from the log itself) and the dev evaluations at or before them; drops the rest.
        Returns (the zero-shot result or None, the training seconds already spent).
        """
        n = len(records)
        before, kept, seen, seconds = None, [], set(), 0.0
        for r in self._metric_rows():
            step = r.get("step", -1)
            if headline(r, "test") and step == 0:
                metric, value = headline(r, "test")
                before = {"metric": metric, metric: value, "loss": r["test_loss"], "n": r.get("n")}
            elif "loss" in r and 0 < step <= n and step not in seen:
                seen.add(step)
                seconds = max(seconds, r.get("seconds") or 0.0)
            elif not (headline(r, "dev") and step <= n and (step == 0 or keep_dev(step))):
                continue
            kept.append(r)
        kept += [step_row(rec.step + 1, rec.losses[0], rec, None) for rec in records if rec.step + 1 not in seen]
        # The order an uninterrupted run writes: zero-shot test, then per step its line and its dev eval.
        kept.sort(key=lambda r: (r["step"], 0 if headline(r, "test") else 1 if "loss" in r else 2))
        self._metrics.close()
        self._atomic_write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        self._metrics = (self.path / "metrics.jsonl").open("a", encoding="utf-8")
        return before, seconds

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._atomic_write("summary.json", json.dumps(summary, indent=2) + "\n")

    def _atomic_write(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path / name)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        self._metrics.close()
        self._steps.close()
        self._lock.close()  # releases the flock

    def discard(self) -> None:
        """Close, and remove what this new run wrote (the folder too when it made it): for a run
        refused before its first step, so that the fixed command can use the same --out."""
        self.close()
        remove_new_entries(self.path, self._existed)

    # -- the checkpoint -------------------------------------------------------------------------
    def write_base(self, base: dict[str, Any]) -> dict[str, Any]:
        """Record the base model on a new run; on resume, refuse a different one. Returns the record.

        `directions` is the direction format the step log was drawn with (missing: format 1);
        `float32_masters`: 16-bit trained tensors are updated through float32 masters (missing: no, a run
        started before them, which resumes and replays as it was trained).
        """
        recorded = self._recorded_base(base)
        if recorded is not None:
            return recorded
        self._atomic_write("base.json", json.dumps(base, indent=2) + "\n")
        return base

    def append_step(self, step: int, record: StepRecord, loss: float) -> None:
        self._steps.write(encode_step(step, record, loss, self._log_format))
        self._steps.flush()

    def read_steps(self, repair: bool = False) -> tuple[list[StepRecord], str | None]:
        """The valid records and, when the log is damaged, a sentence saying where.

        With `repair`, a damaged tail is cut off so that the run continues from the last good step.
        """
        data = (self.path / "steps.log").read_bytes()
        records, good, problem = decode_steps(data)
        if problem and repair:
            self._steps.flush()
            os.truncate(self.path / "steps.log", good)
        return records, problem

    def write_snapshot(self, step: int, params: list[torch.Tensor], keep: int = 2) -> None:
        save(self.path / "snapshots", step, params, keep, self.protected)

    def plot(self) -> Path:
        """curve.png: training loss (and its running mean) and the dev metric against steps."""
        return plot(self.path)


# What a run folder holds (zotune.trackers add tensorboard/ and wandb/; zotune eval adds eval.json).
RUN_ENTRIES = {"config.yaml", "base.json", "steps.log", "metrics.jsonl", "summary.json", "curve.png", "lock",
               "snapshots", "eval.json", "trial.json", "tensorboard", "wandb"}


def step_row(step: int, loss: float, rec: StepRecord, seconds: float | None) -> dict:
    """A step's line of metrics.jsonl: the first group's lr as `lr`, and every group's as `lrs` when the
    trained forms have lrs of their own (`method.lr_scale`)."""
    row = {"step": step, "loss": loss, "grads": rec.grads, "seed": rec.seed, "lr": rec.lrs[0], "seconds": seconds}
    if len(rec.lrs) > 1:
        row["lrs"] = list(rec.lrs)
    return row


def _never_started(path: Path) -> bool:
    """A run folder zotune made for a run that stopped before its first step (killed while loading, say):
    only run files, and a steps.log of this format that holds no step. A new run may start in it."""
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    log = path / "steps.log"
    return names <= RUN_ENTRIES and log.is_file() and log.stat().st_size == len(LOG_MAGIC) and \
        log.read_bytes() == LOG_MAGIC
