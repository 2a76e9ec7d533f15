"""`model.trainable=auto`: a short trial scored on dev chooses what trains; the choice is recorded, so
the run resumes and replays as chosen; naming what to train skips it."""

import json

import yaml

from zotune import trial
from zotune.cli import main

FAST = ["run.batch_size=4", "task.n_dev=8", "task.n_test=8", "run.eval_every=10", "run.device=cpu",
        "task.verbalizer={pos: great, neg: terrible}"]


def train(model, data, out, *extra, steps=40):
    return main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
                 *FAST, *extra])


def test_the_trial_chooses_records_and_the_run_resumes_as_chosen(tiny_model_dir, data_file, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert train(tiny_model_dir, data_file, whole, steps=100) == 0  # (a trial takes at least a step of each)
    printed = capsys.readouterr().out
    record = json.loads((whole / "trial.json").read_text())
    assert [c["candidate"] for c in record["candidates"]] == list(trial.CANDIDATES)
    assert all(c["dev"] is not None and c["zero_shot"] == record["candidates"][0]["zero_shot"]
               for c in record["candidates"])  # every candidate scored on the same dev split, from the same base
    assert record["chosen"] == trial._pick([dict(c) for c in record["candidates"]], 8)["candidate"]
    assert record["forward_passes"] <= 0.15 * record["run_forward_passes"]  # the stated share, at most
    assert {c["forward_passes"] for c in record["candidates"]} <= set(range(9, 11))  # the same budget each (10)
    config = yaml.safe_load((whole / "config.yaml").read_text())
    chosen = ("lora" if config["adapter"]["kind"] == "lora" else config["model"]["trainable"])
    assert chosen == record["chosen"] and f"model.trainable=auto chose {chosen}" in printed
    # config.yaml names what trains: a resume continues exactly that, without a new trial, and equals a run
    # of that config.yaml (no trial either: it names what to train) taken in one go
    parts = tmp_path / "parts"
    assert train(tiny_model_dir, data_file, parts, steps=20) == 0
    capsys.readouterr()
    assert main(["resume", str(parts), "run.steps=40"]) == 0
    assert "trial:" not in capsys.readouterr().out
    again = tmp_path / "again"
    assert main(["train", "--config", str(parts / "config.yaml"), "--out", str(again), "--steps", "40"]) == 0
    assert "trial:" not in capsys.readouterr().out and not (again / "trial.json").exists()
    assert (parts / "steps.log").read_bytes() == (again / "steps.log").read_bytes()


def test_naming_what_to_train_or_an_adapter_skips_the_trial(tiny_model_dir, data_file, tmp_path, capsys):
    assert train(tiny_model_dir, data_file, tmp_path / "a", "--trainable", "last-blocks:1", steps=4) == 0
    assert train(tiny_model_dir, data_file, tmp_path / "b", "adapter.kind=lora", steps=4) == 0
    assert "trial:" not in capsys.readouterr().out
    assert not (tmp_path / "a" / "trial.json").exists() and not (tmp_path / "b" / "trial.json").exists()


def test_where_no_trial_can_run_auto_is_the_probe_and_says_why(tiny_model_dir, data_file, tmp_path, capsys):
    assert train(tiny_model_dir, data_file, tmp_path / "a", "--offload", "cpu", steps=4) == 0
    said = capsys.readouterr().out
    assert "note: model.trainable=auto trains the final norm with streamed blocks" in said
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["model"]["trainable"] == "final-norm"
    assert train(tiny_model_dir, data_file, tmp_path / "b", "task.n_dev=0", "run.keep=last", steps=4) == 0
    assert "without a dev split" in capsys.readouterr().out


def test_a_bad_input_is_refused_before_any_trial(tiny_model_dir, data_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert train(tiny_model_dir, data_file, mine) == 2
    out, err = capsys.readouterr()
    assert "trial:" not in out and "is not empty" in err
    assert train(tiny_model_dir, tmp_path / "nope.csv", tmp_path / "r") == 2
    out, err = capsys.readouterr()
    assert "trial:" not in out and "nope.csv does not exist" in err and not (tmp_path / "r").exists()


def test_the_first_candidate_that_learns_is_held_and_a_later_one_must_lead_beyond_the_dev_noise():
    """32 dev examples: twice the noise of two scores is 2 sqrt(2 p (1 - p) / 32) = 0.25 at p = 0.5."""
    def rows(**dev):
        return [{"candidate": name, "dev": dev[name.replace("-", "_").replace(":", "")], "zero_shot": 0.4,
                 "dev_loss": 0.5} for name in trial.CANDIDATES]

    pick = lambda **dev: trial._pick(rows(**dev), 32)["candidate"]  # noqa: E731
    assert pick(final_norm=0.5, last_blocks2=0.7, lora=0.74) == "final-norm"  # +0.20, +0.24: within the noise
    assert pick(final_norm=0.5, last_blocks2=0.6, lora=0.8) == "lora"  # +0.30: beyond it
    assert pick(final_norm=0.4, last_blocks2=0.45, lora=0.6) == "last-blocks:2"  # the probe did not learn
    assert pick(final_norm=0.3, last_blocks2=0.4, lora=0.2) == "final-norm"  # none learned: the probe
    held = rows(final_norm=0.75, last_blocks2=0.80, lora=0.99)
    assert trial._pick(held, 200)["candidate"] == "lora" and held[1]["margin"] == 0.0866  # 2 x sqrt(2 x .1875 / 200)


def test_the_chosen_candidate_runs_with_its_whole_recipe(monkeypatch, tiny_model_dir, data_file):
    scores = {"final-norm": 0.5, "last-blocks:2": 0.5, "lora": 0.9}

    def fake_try(name, cfgs, budget, scored, folder, metric, log, zero_shot=None, **options):
        return {"candidate": name, "dev": scores[name], "dev_loss": 0.5, "zero_shot": 0.4, "forward_passes": 1}

    monkeypatch.setattr(trial, "try_candidate", fake_try)
    values = {"model": {"name": str(tiny_model_dir)}, "task": {"data": str(data_file), "n_dev": 8, "n_test": 8,
                                                               "verbalizer": {"pos": "great", "neg": "terrible"}}}
    cfgs, record = trial.choose_trainable(values, log=lambda *a: None)
    assert record["chosen"] == "final-norm" and cfgs["method"].name == "fzoo" and cfgs["method"].lr == 0.2
    scores.update({"final-norm": 0.4, "last-blocks:2": 0.4})  # neither beats zero-shot: LoRA is held
    cfgs, record = trial.choose_trainable(values, log=lambda *a: None)
    assert record["chosen"] == "lora" and cfgs["adapter"].kind == "lora" and cfgs["method"].name == "zosgd"
    assert cfgs["method"].lr == 1e-3
