"""Block streaming (ZO2): fine-tune models larger than the compute device's memory, or than RAM.

    engine = stream_(model, StreamConfig(tier="cpu"), device)      # blocks to host memory
    loss = engine.step(opt, closure)                                # one ZO step, each block visited once
    engine.flush()                                                  # before a checkpoint / at the end

A disk-tier folder is made once (`prepare_folder`, or `zotune stream prepare`) and opened with
`load_streamed(folder, device)`, which never holds more than a few blocks in memory.
"""

from zotune.precision import Precision
from zotune.stream.api import StreamConfig, stream_, unstream_
from zotune.stream.carry import keeps_state
from zotune.stream.disk import DiskTier
from zotune.stream.engine import StreamEngine, refuse_unstreamable
from zotune.stream.folder import (
    export_streamed,
    folder_tokenizer,
    is_stream_folder,
    load_streamed,
    prepare_folder,
    write_folder,
)
from zotune.stream.ram import RamTier
from zotune.stream.tier import BlockState, Tier

__all__ = ["BlockState", "DiskTier", "Precision", "RamTier", "StreamConfig", "StreamEngine", "Tier", "export_streamed",
           "folder_tokenizer", "is_stream_folder", "keeps_state", "load_streamed", "prepare_folder",
           "refuse_unstreamable", "stream_", "unstream_", "write_folder"]
