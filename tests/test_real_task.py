"""Opt-in (`pytest -m slow`, several minutes): the default job on the real model and data, shortened."""

import json

import pytest

from zotune.cli import main


@pytest.mark.slow
def test_default_job_beats_zero_shot_on_rotten_tomatoes(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "600", "--eval-every", "0", "task.n_test=300"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["accuracy"] >= summary["before"]["accuracy"] + 0.05


@pytest.mark.slow
def test_an_int4_base_trains_exactly_as_the_float_model_it_was_shipped_as(tmp_path):
    """SmolLM2 ships as GGUF Q4_1; int4 uses that grid, so the 28 frozen blocks held in 4 bits compute
    what the float32 ones do and the run's step log is the same, byte for byte."""
    args = ["train", "--steps", "20", "--eval-every", "0", "task.n_test=50", "task.n_dev=20"]
    assert main([*args, "--out", str(tmp_path / "float")]) == 0
    assert main([*args, "model.quantize=int4", "--out", str(tmp_path / "int4")]) == 0
    assert (tmp_path / "int4" / "steps.log").read_bytes() == (tmp_path / "float" / "steps.log").read_bytes()
