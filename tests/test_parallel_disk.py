"""The disk tier under several ranks: one writer per stream folder, a lagging rank, kill -9 and resume.

Every rank of a data-parallel run computes the same update of every block. Only one of them may write
a folder: the two-slot protocol (write the slot that is not current, then flip the record) is correct
for one writer only, and a second writer that reads the record after the first one's flip overwrites
the slot that resume goes back to.
"""

import signal
import struct
import time

import pytest
import torch

from conftest import exported
from test_parallel import launch, train_args, wait_all

RECORD = struct.Struct("<qqqqqqq")  # the disk format's state.bin record: (version, perturbed, seed) x 2, current

# Run as a rank: rank 1 writes each block back only once rank 0 has written the same state and made it
# current, the interleaving that lost the previous slot when every rank wrote the folder.
LAGGING = """
import os, struct, sys, time
from zotune.cli import main
from zotune.stream import DiskTier

RECORD = struct.Struct("<qqqqqqq")
write = DiskTier.write

def on_disk(folder, j):
    with open(os.path.join(folder, "state.bin"), "rb") as f:
        f.seek(j * RECORD.size)
        v0, p0, s0, v1, p1, s1, current = RECORD.unpack(f.read(RECORD.size))
    return ((v0, p0, s0), (v1, p1, s1))[current]

def lagging(self, j, tensors, state, opt_state=None):
    deadline = time.time() + 60
    while on_disk(self.folder, j) != (state.version, state.perturbed, state.seed) and time.time() < deadline:
        time.sleep(0.001)
    return write(self, j, tensors, state, opt_state)

if os.environ["RANK"] == "1":
    DiskTier.write = lagging
sys.exit(main(sys.argv[1:]))
"""


def records(folder):
    raw = (folder / "state.bin").read_bytes()
    return [RECORD.unpack_from(raw, j * RECORD.size) for j in range(len(raw) // RECORD.size)]


@pytest.mark.parametrize("method", [[], ["--method", "zoadam"]], ids=["zosgd", "zoadam"])
def test_a_lagging_rank_never_overwrites_the_slot_resume_goes_back_to(method, tiny_model_dir, data_file, tmp_path):
    """Rank 1 writes back each block only after rank 0 has (forced, not left to timing). Both slots of
    every block must still differ, the run must equal the resident one, and with Adam the moments
    travel through the same slots."""
    script = tmp_path / "lagging_rank.py"
    script.write_text(LAGGING)
    out, folder = tmp_path / "run", tmp_path / "blocks"
    argv = train_args(tiny_model_dir, data_file, out, "parallel.data=2", "--offload", "disk", "--offload-dir",
                      str(folder), *method)
    procs = launch(2, argv, tmp_path, entry=[str(script)])
    assert wait_all(procs) == [0, 0], (tmp_path / "rank1.log").read_text()[-2000:]
    for j, (v0, p0, s0, v1, p1, s1, current) in enumerate(records(folder)):
        # the current slot holds the last write-back, the other one the block as it was before it
        assert (v0, p0, s0) != (v1, p1, s1), f"block {j}: both slots hold the same state"
    assert not list(folder.glob(".*")), "a rank left a marker or a temporary file in the folder"
    resident = tmp_path / "resident"
    argv = train_args(tiny_model_dir, data_file, resident, "parallel.data=2", *method)
    assert wait_all(launch(2, argv, tmp_path)) == [0, 0]
    assert (out / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()


def test_two_disk_tier_ranks_killed_inside_a_run_resume_exactly(tiny_model_dir, data_file, tmp_path):
    """kill -9 of both ranks at a moment they do not choose, then `resume` on 2 ranks: the same log and
    weights as an uninterrupted data = 2 run (the folder's one writer went back where it had to)."""
    steps = 30
    ref = tmp_path / "ref"
    argv = train_args(tiny_model_dir, data_file, ref, "parallel.data=2", "run.eval_every=0", steps=steps)
    assert wait_all(launch(2, argv, tmp_path)) == [0, 0]
    out, folder = tmp_path / "run", tmp_path / "blocks"
    argv = train_args(tiny_model_dir, data_file, out, "parallel.data=2", "run.eval_every=0", "--offload", "disk",
                      "--offload-dir", str(folder), steps=steps)
    procs = launch(2, argv, tmp_path)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "steps.log").exists()
                                          and (out / "steps.log").stat().st_size >= 8 + 42 * 6):
        time.sleep(0.01)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    written = (out / "steps.log").stat().st_size
    assert 8 + 42 * 6 <= written < 8 + 42 * steps, "the run was not killed inside its steps"
    assert wait_all(launch(2, ["resume", str(out)], tmp_path)) == [0, 0], (tmp_path / "rank0.log").read_text()[-2000:]
    assert (out / "steps.log").read_bytes() == (ref / "steps.log").read_bytes()
    a, b = exported(ref, tmp_path / "ref-model"), exported(out, tmp_path / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
