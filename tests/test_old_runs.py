"""Run folders written by an earlier zotune (commit 781d308, before the redesign of 2026-12-06) still
resume, replay and export: a run folder is a record, and a newer zotune must read it as it was written.

`tests/data/runs-781d308/run-<method>` were made in a folder holding `tiny-llama` (the `tiny_model_dir`
model) and `reviews.csv` (the `data_file` rows), named by those relative paths, with
`zotune train --model tiny-llama --data reviews.csv --out run-<method> --steps 4` and the options below.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import exported
from zotune.cli import main

OPTIONS = ["run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=2", "run.snapshot_every=2",
           "run.keep=last",  # as the recorded runs kept (the default was then last)
           "run.device=cpu", "--lr", "1e-2", "task.verbalizer={pos: great, neg: terrible}", "--trainable",
           "last-blocks:1"]
RECORDED = Path(__file__).parent / "data" / "runs-781d308"


@pytest.fixture
def place(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A folder laid out as the recorded runs expect, as the working directory."""
    shutil.copytree(tiny_model_dir, tmp_path / "tiny-llama")
    shutil.copy(data_file, tmp_path / "reviews.csv")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("method", ["zosgd", "zoadam"])
def test_a_run_recorded_by_an_earlier_zotune_resumes_replays_and_exports_as_a_new_one(method, place):
    old = place / "old"
    shutil.copytree(RECORDED / f"run-{method}", old)
    new = place / "new"
    assert main(["train", "--model", "tiny-llama", "--data", "reviews.csv", "--out", str(new), "--steps", "4",
                 *OPTIONS, "--method", method]) == 0
    assert (old / "steps.log").read_bytes() == (new / "steps.log").read_bytes()  # the same 4 steps today

    a, b = exported(old, place / "old-export"), exported(new, place / "new-export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["replay", str(old), "--out", str(place / "old-replay")]) == 0  # from the base and the log alone
    replayed = {k: v for f in sorted((place / "old-replay").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert replayed.keys() == a.keys() and all(torch.equal(a[k], replayed[k]) for k in a)

    assert main(["resume", str(old), "run.steps=6"]) == 0
    assert main(["resume", str(new), "run.steps=6"]) == 0
    assert (old / "steps.log").read_bytes() == (new / "steps.log").read_bytes()
    a, b = exported(old, place / "old-6"), exported(new, place / "new-6")
    assert all(torch.equal(a[k], b[k]) for k in a)
