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

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zotune.config import ConfigError
from zotune.methods import StepRecord
from zotune.tasks.base import METRICS
from zotune.trackers import tracker_names


@dataclass
class RunConfig:
    """How long to train and where the run goes."""

    out: str | None = None  # default: runs/<timestamp>
    steps: int = 1200
    batch_size: int = 16
    eval_batch_size: int = 32
    eval_every: int = 300  # dev evaluation every N steps (0: only at the end)
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    prefix_cache_mb: int = 2048  # frozen-prefix outputs kept across epochs (0: recompute every step)
    snapshot_every: int = 200  # trainable tensors saved every N steps to bound replay on resume (0: never)
    group_by_length: bool = True  # training batches of similar lengths (less padding), as HF's Trainer option
    report_to: str = "none"  # also log to: tensorboard, wandb, or both comma-separated (when installed)
    lr_schedule: str = "constant"  # constant, linear or cosine (zotune.schedule), after a linear warm-up
    warmup_steps: int = 0
    keep: str = "last"  # the weights a run ends with: last, or best (the step of the best dev metric)
    patience: int = 0  # stop after this many dev evaluations without a better one (0: never stop early)

    def __post_init__(self):
        from zotune.schedule import SCHEDULES

        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"run.lr_schedule={self.lr_schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"run.warmup_steps={self.warmup_steps} must be >= 0")
        if self.keep not in ("last", "best"):
            raise ConfigError(f"run.keep={self.keep!r}: use last (the final step) or best (the best dev evaluation)")
        if self.patience < 0:
            raise ConfigError(f"run.patience={self.patience} must be >= 0 (0: never stop early)")
        if self.steps < 0:
            raise ConfigError(f"run.steps={self.steps} must be >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("run.batch_size and run.eval_batch_size must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"run.eval_every={self.eval_every} must be >= 0 (0 evaluates only at the end)")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            raise ConfigError(f"run.device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        if self.prefix_cache_mb < 0:
            raise ConfigError(f"run.prefix_cache_mb={self.prefix_cache_mb} must be >= 0 (0 turns the cache off)")
        if self.snapshot_every < 0:
            raise ConfigError(f"run.snapshot_every={self.snapshot_every} must be >= 0 (0: the log alone)")
        if self.threads < 0:
            raise ConfigError(f"run.threads={self.threads} must be >= 0")
        tracker_names(self.report_to)  # an unknown tracker stops the run here


class RunFolder:
    """One run's folder. Every write is flushed as it happens, so a killed run keeps what it logged."""

    def __init__(self, path: str | Path | None, resume: bool = False):
        self.path = Path(path) if path else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        if resume:
            if not (self.path / "config.yaml").is_file():
                raise ConfigError(f"{self.path} is not a zotune run folder (no config.yaml); pass the folder of a run")
        elif (self.path / "summary.json").exists() or any(
                (self.path / name).exists() and (self.path / name).stat().st_size
                for name in ("steps.log", "metrics.jsonl")):
            raise ConfigError(f"run folder {self.path} already holds a run; pass another --out, or "
                              f"`zotune resume {self.path}`")
        # What was here before: a run refused during its setup takes away only what it wrote (`discard`).
        self._existed = entries(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = (self.path / "lock").open("a+")
        except OSError as e:
            raise ConfigError(f"cannot write the run folder {self.path} ({e.strerror}); pass a writable "
                              f"--out") from None
        if not _try_lock(self._lock):
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
        self.trackers: list = []  # zotune.trackers: copies of the metrics, when run.report_to asks
        self.protected = -1  # the step of a snapshot never removed (the best one, with run.keep=best)

    def write_config(self, sections: dict[str, Any]) -> None:
        import yaml

        self._atomic_write("config.yaml", yaml.safe_dump(sections, sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)
        self._metrics.flush()

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
        kept += [{"step": rec.step + 1, "loss": rec.losses[0], "grads": rec.grads, "seed": rec.seed,
                  "lr": rec.lrs[0], "seconds": None} for rec in records if rec.step + 1 not in seen]
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

    def write_snapshot(self, step: int, params: list[torch.Tensor], keep: int = 2) -> None:
        from safetensors.torch import save_file

        folder = self.path / "snapshots"
        folder.mkdir(exist_ok=True)
        tensors = {f"t{i}": p.detach().contiguous().cpu() for i, p in enumerate(params)}
        name = f"step-{step:07d}.safetensors"
        save_file(tensors, folder / f".{name}.tmp",
                  metadata={"step": str(step), "digest": tensor_digest(tensors.values())})
        os.replace(folder / f".{name}.tmp", folder / name)
        for old in sorted(folder.glob("step-*.safetensors"))[:-keep]:
            if old.name != f"step-{self.protected:07d}.safetensors":
                old.unlink()

    def latest_snapshot(self, max_step: int, params: list[torch.Tensor]) -> tuple[int, str | None]:
        """Load the newest intact snapshot at or before `max_step` into `params`; (its step, a note)."""
        from safetensors import safe_open

        note = None
        for path in sorted((self.path / "snapshots").glob("step-*.safetensors"), reverse=True):
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                    step = int(meta["step"])
                    if step > max_step:
                        continue
                    tensors = [f.get_tensor(f"t{i}") for i in range(len(params))]
                if tensor_digest(tensors) != meta["digest"] or any(t.shape != p.shape for t, p in zip(tensors, params)):
                    raise ValueError("digest or shapes differ")
            except Exception as e:  # noqa: BLE001 -- any damage means: fall back to an older snapshot
                note = f"snapshot {path.name} is damaged ({type(e).__name__}); using an older one or the base"
                continue
            with torch.no_grad():
                for p, t in zip(params, tensors):
                    p.copy_(t)
            return step, note
        return 0, note

    def plot(self) -> Path:
        """curve.png: training loss (and its running mean) and the dev metric against steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
        evaluations = [(r["step"], headline(r, "dev")) for r in rows]
        dev = [(step, found[1]) for step, found in evaluations if found]
        metric = next((found[0] for _, found in evaluations if found), "accuracy")
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        if train:
            steps, losses = zip(*train)
            ax1.plot(steps, losses, lw=0.6, alpha=0.4, label="step loss")
            window = max(1, len(losses) // 20)
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            ax1.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
            ax1.legend()
        ax1.set(xlabel="step", ylabel="training loss", title="loss")
        if dev:
            ax2.plot(*zip(*dev), marker="o")
        ax2.set(xlabel="step", ylabel=f"dev {metric}", title=f"dev {metric}")
        fig.tight_layout()
        out = self.path / "curve.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def headline(row: dict[str, Any], split: str) -> tuple[str, float] | None:
    """(metric, value) of the evaluation of `split` (dev or test) a metrics.jsonl row holds, if any."""
    for metric in HEADLINE_METRICS:
        if f"{split}_{metric}" in row:
            return metric, row[f"{split}_{metric}"]
    return None


# What a task's evaluation logs as dev_<metric> / test_<metric>: any type's metric.
HEADLINE_METRICS = tuple(dict.fromkeys(m for names in METRICS.values() for m in names))


# ----------------------------------------------------------------------------------------------
# steps.log, little-endian. Format 2 (since logs began with LOG_MAGIC): after the 8-byte magic, per
# step: step u32, seed i64, n u8, m u8, n x grad f64, m x lr f64 (one per parameter group, what
# replay pairs with each group), loss f64, then the CRC32 of all of that (42 bytes for one direction
# and one group). Format 1 (no magic; read, and appended to, as it is): step u32, seed i64, n u8,
# n x grad f64, lr f64 (the first group's only), loss f64, CRC32.
LOG_MAGIC = b"ZOTLOG2\n"
_HEAD = struct.Struct("<IqB")
_HEAD2 = struct.Struct("<IqBB")
_TAIL = struct.Struct("<dd")
_LOSS = struct.Struct("<d")
_CRC = struct.Struct("<I")


class FollowerRun(RunFolder):
    """The run folder as ranks other than 0 see it: they read the log and snapshots and write nothing."""

    def __init__(self, path: str | Path):  # no lock and no open files: rank 0 owns the folder
        self.path = Path(path)

    def read_steps(self, repair: bool = False) -> tuple[list[StepRecord], str | None]:
        return super().read_steps(repair=False)  # rank 0 repairs

    def rewind_metrics(self, records, keep_dev) -> tuple[dict | None, float]:
        return None, 0.0  # rank 0 decides and broadcasts

    def write_config(self, *args, **kwargs) -> None: pass
    def log(self, *args, **kwargs) -> None: pass
    def write_base(self, base: dict[str, Any]) -> dict[str, Any]:
        return self._recorded_base(base) or base  # checked, never written (rank 0 writes it, atomically)
    def append_step(self, *args, **kwargs) -> None: pass
    def write_snapshot(self, *args, **kwargs) -> None: pass
    def write_summary(self, *args, **kwargs) -> None: pass
    def plot(self) -> Path: return self.path / "curve.png"
    def close(self) -> None: pass
    def discard(self) -> None: pass


def entries(path: Path) -> set[str] | None:
    """The names in folder `path` (None when there is no such folder): what `remove_new_entries` keeps."""
    return set(os.listdir(path)) if path.is_dir() else None


def remove_new_entries(path: Path, existed: set[str] | None) -> None:
    """Remove from `path` what is not in `existed` (all of `path` when it did not exist)."""
    if existed is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    for name in set(os.listdir(path)) - existed if path.is_dir() else ():
        target = path / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def encode_step(step: int, record: StepRecord, loss: float, log_format: int = 2) -> bytes:
    """One record of steps.log in `log_format` (that of the log it is appended to)."""
    grads = struct.pack(f"<{len(record.grads)}d", *record.grads)
    if log_format == 1:
        body = _HEAD.pack(step, record.seed, len(record.grads)) + grads + \
            _TAIL.pack(record.lrs[0] if record.lrs else float("nan"), loss)
    else:
        if len(record.grads) > 255 or len(record.lrs) > 255:
            raise ValueError("a step record holds at most 255 projected gradients and 255 parameter groups")
        body = _HEAD2.pack(step, record.seed, len(record.grads), len(record.lrs)) + grads + \
            struct.pack(f"<{len(record.lrs)}d", *record.lrs) + _LOSS.pack(loss)
    return body + _CRC.pack(zlib.crc32(body))


def log_format(data: bytes) -> int:
    """The format of a steps.log that starts with `data` (an empty log is written in the newest)."""
    return 2 if not data or data.startswith(LOG_MAGIC) else 1


def decode_steps(data: bytes) -> tuple[list[StepRecord], int, str | None]:
    """(records, bytes that are good, None or what is wrong after the last good step); either format."""
    records: list[StepRecord] = []
    fmt = log_format(data)
    pos = len(LOG_MAGIC) if data.startswith(LOG_MAGIC) else 0
    head = _HEAD if fmt == 1 else _HEAD2
    while pos < len(data):
        problem = None
        if pos + head.size > len(data):
            problem = "truncated"
        else:
            step, seed, n, *rest = head.unpack_from(data, pos)
            m = rest[0] if rest else 1
            end = pos + head.size + 8 * (n + m + 1) + _CRC.size
            if end > len(data):
                problem = "truncated"
            elif zlib.crc32(data[pos: end - _CRC.size]) != _CRC.unpack_from(data, end - _CRC.size)[0]:
                problem = "corrupted (checksum mismatch)"
            elif step != len(records) + 1:
                problem = f"out of order (step {step} after {len(records)})"
        if problem:
            return records, pos, (f"steps.log is {problem} after step {len(records)}; the run continues from step "
                                  f"{len(records)}")
        values = struct.unpack_from(f"<{n + m + 1}d", data, pos + head.size)
        grads, lrs, loss = list(values[:n]), list(values[n: n + m]), values[-1]
        records.append(StepRecord(step - 1, seed, grads, [loss], lrs))
        pos = end
    return records, pos, None


def tensor_digest(tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _try_lock(f) -> bool:
    """An exclusive, non-blocking lock that the OS drops when the process dies."""
    try:
        if os.name == "nt":
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
