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
