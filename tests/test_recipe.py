"""The recipe around the steps: a learning-rate schedule (recorded, so replay and resume never
recompute it), the best dev checkpoint kept (`run.keep=best`), and early stopping on dev."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import exported
from zotune.cli import main
from zotune.schedule import lr_factor
from zotune.steplog import decode_steps

COMMON = ["run.batch_size=4", "task.n_dev=8", "task.n_test=8", "run.eval_every=2", "run.device=cpu",
          "--lr", "5e-2", "task.verbalizer={pos: great, neg: terrible}",
          "--method", "zosgd",  # lr and tolerances calibrated for ZO-SGD, which these tests are not about
          "model.trainable=last-blocks:2"]


def train(model, data, out, *extra, steps=10):
    return main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
                 *COMMON, *extra])


def test_schedule_factors():
    assert all(lr_factor("constant", s, 10) == 1.0 for s in range(1, 11))
    assert [lr_factor("constant", s, 10, warmup=4) for s in range(1, 6)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_factor("linear", s, 4) for s in range(1, 5)] == [1.0, 0.75, 0.5, 0.25]
    cosine = [lr_factor("cosine", s, 102, warmup=2) for s in range(1, 103)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] == pytest.approx(0.5 * (1 + math.cos(0.99 * math.pi)))
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))


def test_a_scheduled_run_records_its_lrs_and_resumes_and_replays_exactly(tiny_model_dir, data_file, tmp_path):
    schedule = ["run.lr_schedule=cosine", "run.warmup_steps=3", "run.snapshot_every=4"]
    whole = tmp_path / "whole"
    assert train(tiny_model_dir, data_file, whole, *schedule) == 0
    records = decode_steps((whole / "steps.log").read_bytes())[0]
    assert [r.lrs[0] for r in records] == [5e-2 * lr_factor("cosine", s, 10, 3) for s in range(1, 11)]
    parts = tmp_path / "parts"
    assert train(tiny_model_dir, data_file, parts, *schedule, steps=5) == 0
    assert main(["resume", str(parts), "run.steps=10"]) == 0  # the schedule is that of run.steps=10 again
    # (the first 5 steps of `parts` followed the 5-step cosine: a resumed run keeps the lrs it logged)
    first = decode_steps((parts / "steps.log").read_bytes())[0]
    assert [r.lrs[0] for r in first[5:]] == [r.lrs[0] for r in records[5:]]
    assert main(["replay", str(whole), "--out", str(tmp_path / "replayed")]) == 0
    a, b = exported(whole, tmp_path / "exported"), load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_ends_with_the_best_dev_step_and_export_and_eval_agree(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_model_dir, data_file, out, "run.keep=best", "run.snapshot_every=3", steps=12) == 0
    summary = json.loads((out / "summary.json").read_text())
    dev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "dev_accuracy" in line]
    best = max(dev, key=lambda r: (r["dev_accuracy"], -r["dev_loss"]))  # the first of the best, on ties
    assert summary["best"]["step"] == best["step"] == summary["kept_step"] < summary["steps"]  # (step 8 of 12)
    assert (out / "snapshots" / f"step-{best['step']:07d}.safetensors").exists()  # kept beside the last two
    # the weights the run ends with are those of that step: its snapshot, the export, and `zotune eval`
    from transformers import AutoModelForCausalLM

    assert main(["export", str(out), "--out", str(tmp_path / "model")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    snapshot = load_file(out / "snapshots" / f"step-{best['step']:07d}.safetensors")
    trained = ("model.layers.1.", "model.layers.2.", "model.norm.")
    params = [p for n, p in model.named_parameters() if n.startswith(trained)]
    assert len(params) == len(snapshot) and all(torch.equal(p, snapshot[f"t{i}"]) for i, p in enumerate(params))
    assert main(["eval", "--model", str(out), "--split", "test", "--out", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())["splits"]["test"]
    assert evaluated["accuracy"] == summary["after"]["accuracy"]
    assert evaluated["loss"] == pytest.approx(summary["after"]["loss"], abs=1e-6)


def test_keep_best_on_the_host_memory_tier_equals_resident(tiny_model_dir, data_file, tmp_path):
    """--offload cpu: the tier holds the last step, so the best one is rebuilt from the base and the log;
    the same test result and kept step as the resident run (run.keep=auto is best on both)."""
    runs = {}
    for name, extra in (("resident", []), ("ram", ["--offload", "cpu"])):
        assert train(tiny_model_dir, data_file, tmp_path / name, "run.snapshot_every=3", *extra, steps=12) == 0
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert runs["ram"]["kept_step"] == runs["resident"]["kept_step"] < 12
    assert runs["ram"]["after"] == runs["resident"]["after"]
    assert main(["eval", "--model", str(tmp_path / "ram"), "--split", "test", "--out", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())["splits"]["test"]
    assert evaluated["accuracy"] == runs["ram"]["after"]["accuracy"]


def test_the_default_keeps_the_zero_shot_weights_when_no_step_beats_them(tiny_model_dir, data_file, tmp_path,
                                                                        capsys):
    """lr 0: no dev evaluation beats step 0's (a tie keeps the earlier step), so the run hands back the model
    it started from, and says why."""
    out = tmp_path / "run"
    assert train(tiny_model_dir, data_file, out, "--lr", "0", steps=8) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept_step"] == 0 and summary["best"]["zero_shot"]
    assert summary["after"]["accuracy"] == summary["before"]["accuracy"]
    assert "keeping the zero-shot weights (step 0, run.keep=best)" in printed


def test_early_stopping_stops_after_patience_evaluations_without_a_better_one(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_model_dir, data_file, out, "run.patience=1", "--lr", "3", steps=40) == 0  # lr 3 diverges fast
    summary = json.loads((out / "summary.json").read_text())
    dev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "dev_accuracy" in line]
    stop = summary["stopped_early"]["step"]
    assert stop < 40 and summary["steps"] == stop and dev[-1]["step"] == stop
    scores = [(r["dev_accuracy"], -r["dev_loss"]) for r in dev]
    assert scores[-1] <= max(scores[:-1])  # the last evaluation did not beat the best before it
    assert all(a < b for a, b in zip(scores[:-2], scores[1:-1]))  # every earlier one did (patience 1)


@pytest.mark.parametrize("extra,match", [
    (["run.keep=best", "run.eval_every=0"], "run.keep=best decides on dev evaluations"),
    (["run.patience=2", "task.n_dev=0"], "run.patience=2 decides on dev evaluations"),
    (["run.keep=best", "--offload", "disk", "--offload-dir", "blocks"],
     "run.keep=best is not yet available with --offload disk"),
    (["run.lr_schedule=step"], "run.lr_schedule='step'"),
    (["run.keep=first"], "run.keep='first'"),
])
def test_recipe_settings_that_cannot_work_are_refused(extra, match, tiny_model_dir, data_file, tmp_path, capsys):
    assert train(tiny_model_dir, data_file, tmp_path / "r", *extra) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_run_that_does_not_beat_zero_shot_on_dev_says_so_once_with_what_to_try(tiny_model_dir, data_file, tmp_path,
                                                                                 capsys):
    """lr 0: the weights never move, so no dev evaluation beats step 0's. Past half the run (step 4 of 8;
    evaluations at 2, 4, 6) one line names it, once, and points at the next things to try."""
    assert train(tiny_model_dir, data_file, tmp_path / "run", "--lr", "0", steps=8) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "has not beaten zero-shot" in line]
    assert len(notes) == 1 and notes[0].startswith("note: after 4 of 8 steps dev accuracy")
    assert "--trainable final-norm" in notes[0] and "task.template" in notes[0]


def test_a_batch_larger_than_the_training_split_is_named_at_start_up(tiny_model_dir, data_file, tmp_path, capsys):
    assert train(tiny_model_dir, data_file, tmp_path / "run", "run.batch_size=64", steps=1) == 0
    assert "note: run.batch_size=64 is larger than the 24 training examples" in capsys.readouterr().out
