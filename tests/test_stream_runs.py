"""`zotune train --offload cpu|disk` against the resident run, and disk-tier runs that stop and resume."""

import json
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file

from conftest import exported
from zotune.cli import main
from zotune.stream import DiskTier

STEPS = 8
OPTIONS = ["run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=3", "run.snapshot_every=5",
           "run.keep=last",  # as a disk-tier run keeps (auto is best only where the base stays)
           "run.device=cpu", "--lr", "1e-2", "task.verbalizer={pos: great, neg: terrible}", "--trainable", "all"]


def train_args(model, data, out, steps=STEPS, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
            *OPTIONS, *extra]


def weights(run, folder=None):
    """Every trainable tensor at the end: the final snapshot, plus the blocks of a disk tier."""
    snap = sorted((run / "snapshots").glob("step-*.safetensors"))[-1]
    out = dict(load_file(snap))
    if folder is not None:
        tier = DiskTier(folder)
        for j in range(len(tier)):
            out.update({f"block{j}.{k}": v.clone() for k, v in tier.read(j)[0].items()})
        tier.close()
    return out


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def resident(tiny_model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("resident") / "run"
    assert main(train_args(tiny_model_dir, data_file, out)) == 0
    return out


def test_ram_tier_run_equals_resident_run(resident, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, STEPS, "--offload", "cpu")) == 0
    assert (out / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()
    assert metrics(out) == metrics(resident)
    a, b = weights(resident), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_disk_tier_run_equals_resident_run_and_resumes_exactly(resident, tiny_model_dir, data_file, tmp_path):
    out, folder = tmp_path / "run", tmp_path / "blocks"
    disk = ["--offload", "disk", "--offload-dir", str(folder)]
    assert main(train_args(tiny_model_dir, data_file, out, STEPS, *disk)) == 0
    assert (out / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()
    assert metrics(out) == metrics(resident)

    # Stopped after 4 steps, resumed to 8: the same log and weights as 8 steps in one go.
    out2, folder2 = tmp_path / "run2", tmp_path / "blocks2"
    disk2 = ["--offload", "disk", "--offload-dir", str(folder2)]
    assert main(train_args(tiny_model_dir, data_file, out2, 4, *disk2)) == 0
    assert main(["resume", str(out2), f"run.steps={STEPS}"]) == 0
    assert (out2 / "steps.log").read_bytes() == (out / "steps.log").read_bytes()
    a, b = weights(out, folder), weights(out2, folder2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A new run on a folder that another run has trained is refused.
    assert main(train_args(folder, data_file, tmp_path / "run3", STEPS)) == 2

    # Export: a standard HF folder with the run's weights, blocks included, written block by block
    # (never all blocks in memory: one shard per block, read from the tier one at a time).
    from transformers import AutoModelForCausalLM

    import zotune.stream.disk as tiers
    import zotune.weights as train_module
    live, most, read = [0], [0], tiers.DiskTier.read

    class Tracked(dict):  # a dict that can be watched by weakref
        pass

    def counted_read(self, j, pool=None):
        values, bufs = read(self, j, pool)
        values = Tracked(values)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(values, lambda: live.__setitem__(0, live[0] - 1))
        return values, bufs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "unstream_", None)  # the whole-model path is not taken
        mp.setattr(tiers.DiskTier, "read", counted_read)
        assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    assert 1 <= most[0] <= 2  # the block being written, and at most one the engine was holding
    shards = sorted(p.name for p in (tmp_path / "exported").glob("model-*.safetensors"))
    # 3 blocks + the rest
    assert len(shards) == 4 and (tmp_path / "exported" / "model.safetensors.index.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    resident_final = load_file(sorted((resident / "snapshots").glob("step-*.safetensors"))[-1])
    params = list(reference.parameters())  # the run's trainable order: all parameters, tied once
    assert len(params) == len(resident_final)
    for (name, p), i in zip(exported.named_parameters(), range(len(params))):
        assert torch.equal(p, resident_final[f"t{i}"]), name


@pytest.mark.parametrize("method", [[], ["--method", "zoadam"], ["--method", "sparse-mezo"]],
                         ids=["zosgd", "zoadam", "sparse-mezo"])
def test_disk_tier_run_killed_anywhere_resumes_exactly(method, tiny_model_dir, data_file, tmp_path):
    """kill -9 at a random moment, inside a step or a write-back or between steps: the resumed run
    ends with the same log and weights as an uninterrupted resident one. With a method that keeps
    state (Adam's moments and step count; Sparse MeZO's thresholds and the mask of the step in
    flight), that state is in the blocks' slots on disk and goes back with them."""
    ref_out = tmp_path / "ref"
    steps = 30
    assert main(train_args(tiny_model_dir, data_file, ref_out, steps, "run.eval_every=0", *method)) == 0
    common = ["--offload", "disk", "run.eval_every=0", *method]
    out, folder = tmp_path / "run", tmp_path / "blocks"
    cmd = [sys.executable, "-m", "zotune", *train_args(tiny_model_dir, data_file, out, steps, *common,
                                                       "--offload-dir", str(folder))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        log = out / "steps.log"
        if log.exists() and log.stat().st_size >= 8 + 42 * 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["resume", str(out)]) == 0
    assert (out / "steps.log").read_bytes() == (ref_out / "steps.log").read_bytes()
    a, b = exported(ref_out, tmp_path / "ref-model"), exported(out, tmp_path / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stream_folder_of_another_model_is_refused(tiny_model_dir, data_file, tokenizer, tmp_path, capsys):
    """--offload-dir names an existing folder: its blocks train only when --model is the model it was written
    from (the same architecture with other weights would otherwise train silently in place of --model)."""
    from conftest import tiny_model
    from zotune.stream import prepare_folder

    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    folder = tmp_path / "blocks"
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "a", 2, "--offload", "disk",
                           "--offload-dir", str(folder))) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(train_args(other, data_file, tmp_path / "c", 2, "--offload", "disk", "--offload-dir", str(folder))) == 2
    assert f"the stream folder {folder} holds the blocks of {tiny_model_dir}, not of --model {other}" in \
        capsys.readouterr().err
    assert not (tmp_path / "c").exists() and {p.name: p.read_bytes() for p in folder.iterdir()} == before
    prepared = prepare_folder(str(tmp_path / "prepared"), checkpoint=str(tiny_model_dir))  # zotune stream prepare
    assert main(train_args(other, data_file, tmp_path / "d", 2, "--offload", "disk", "--offload-dir",
                           str(prepared))) == 2
    assert "holds the blocks of" in capsys.readouterr().err
