"""Small helpers for the files zotune writes: what a folder held before, locks, digests, a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import torch

from zotune.config import ConfigError


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


def tensor_digest(tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def weights_identity(folder: str, file: str | None = None) -> str:
    """A digest that tells one model's weight files from another's without reading them whole: each file's
    name, size, first 64 KiB (a safetensors header, say) and 16 samples of 4 KiB spread over it. A name
    that is not a local path (a hub name) is its own identity."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return f"name:{folder}"
    files = [root / file] if file else sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.blake2b(digest_size=16)
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 16))
            for k in range(16):
                f.seek(size * k // 16)
                h.update(f.read(4096))
    return h.hexdigest()


def try_lock(f) -> bool:
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


# -- what zotune may write: folders it creates, or its own (a user's files are never touched) --------------

def check_new_folder(path: Path, option: str, own=None) -> None:
    """Refuse, in one line and before any write, an output folder zotune may not write into: a file, or a
    folder that holds anything, unless `own(path)` recognises it as zotune's own."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder; pass a folder that does not exist yet")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held and not (own is not None and own(path)):
        raise ConfigError(f"{option} {path} is not empty (it holds {held[0]}{', ...' if len(held) > 1 else ''}): "
                          f"zotune writes only into a folder it creates; pass a new folder")


def check_new_file(path: Path, option: str, own=None) -> None:
    """Refuse an output file zotune may not write: a folder, or a file that exists, unless `own(path)`
    recognises it as one zotune wrote."""
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; pass a file name")
    if path.exists() and not (own is not None and own(path)):
        raise ConfigError(f"{option} {path} exists and zotune did not write it; pass a new file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: {path.parent} is a file, not a folder")
