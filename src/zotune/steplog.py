"""steps.log, the checkpoint of a run: one binary record per step, each with its own CRC32.

Little-endian. Format 2 (since logs began with LOG_MAGIC): after the 8-byte magic, per step: step
u32, seed i64, n u8, m u8, n x grad f64, m x lr f64 (one per parameter group, what replay pairs with
each group), loss f64, then the CRC32 of all of that (42 bytes for one direction and one group).
Format 1 (no magic; read, and appended to, as it is): step u32, seed i64, n u8, n x grad f64, lr f64
(the first group's only), loss f64, CRC32.
"""

from __future__ import annotations

import struct
import zlib

from zotune.methods import StepRecord

LOG_MAGIC = b"ZOTLOG2\n"
_HEAD = struct.Struct("<IqB")
_HEAD2 = struct.Struct("<IqBB")
_TAIL = struct.Struct("<dd")
_LOSS = struct.Struct("<d")
_CRC = struct.Struct("<I")


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
