"""`method.lr=auto`: a short search on the training rows picks the lr; it is recorded, so the run
resumes and replays with it; the choice rule; where it cannot search, the default and why."""

import json

import pytest
import yaml

from test_trial import FAST, train
from zotune import lr_search
from zotune.cli import main


def test_the_search_chooses_records_and_the_run_resumes_with_the_lr(tiny_model_dir, data_file, tmp_path, capsys):
    parts = tmp_path / "parts"
    assert train(tiny_model_dir, data_file, parts, "--trainable", "last-blocks:1", "--lr", "auto", steps=30) == 0
    printed = capsys.readouterr().out
    search = json.loads((parts / "trial.json").read_text())["lr_search"]
    tried = [r["lr"] for r in search["tried"]]
    assert tried == [float(f"{search['default'] * f:.3g}") for f in lr_search.FACTORS]
    assert len({r["zero_shot_loss"] for r in search["tried"]}) == 1  # the same rows, from the same base
    assert search["chosen"] == lr_search._pick(search["tried"], search["default"])[0]
    assert search["forward_passes"] <= 0.25 * search["run_forward_passes"]  # 5 x 4% of the run (at least a step)
    config = yaml.safe_load((parts / "config.yaml").read_text())
    assert config["method"]["lr"] == search["chosen"] and f"method.lr=auto chose {search['chosen']:g}" in printed
    # config.yaml holds the number: a resume takes no new search, and equals a run of that config.yaml
    # (no search either: it names the lr) taken in one go
    assert main(["resume", str(parts), "run.steps=60"]) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(parts / "config.yaml"), "--out", str(again), "--steps", "60"]) == 0
    assert "lr search" not in capsys.readouterr().out and not (again / "trial.json").exists()
    assert (parts / "steps.log").read_bytes() == (again / "steps.log").read_bytes()


def test_the_largest_loss_decrease_wins_and_near_ties_go_to_the_smaller_lr():
    def row(lr, loss, base=1.0):
        return {"lr": lr, "dev_loss": loss, "zero_shot_loss": base}

    assert lr_search._pick([row(1e-3, 0.9), row(3e-3, 0.7), row(1e-2, 0.8)], 5e-3)[0] == 3e-3
    assert lr_search._pick([row(1e-3, 0.9), row(3e-3, 0.7), row(1e-2, 0.69)], 5e-3)[0] == 3e-3  # within TIE
    assert lr_search._pick([row(1e-3, 0.9), row(3e-3, 0.7), row(1e-2, 0.6)], 5e-3)[0] == 1e-2  # beyond TIE
    # ties are measured on the decrease, not the loss: 0.4585 vs 0.4549 is 0.8% of the loss but 21% of the drop
    assert lr_search._pick([row(1e-3, 0.4585, 0.4586 + 0.0170), row(3e-3, 0.4549, 0.4586 + 0.0170)], 5e-3)[0] == 3e-3
    assert lr_search._pick([row(1e-3, 0.9), row(3e-3, float("nan")), row(1e-2, float("inf"))], 5e-3)[0] == 1e-3
    lr, why = lr_search._pick([row(1e-3, 1.1), row(3e-3, 1.0)], 5e-3)  # none beats the base: the default
    assert lr == 5e-3 and "default" in why
    # the search moved nothing (cge on a probe: 0.4586 -> 0.4585): no signal, the default, and said so
    lr, why = lr_search._pick([row(1e-3, 0.45861, 0.45861), row(0.1, 0.45853, 0.45861)], 1e-2)
    assert lr == 1e-2 and "too few steps" in why


def test_lr_auto_is_refused_nowhere_and_is_the_default_where_it_cannot_search(tiny_model_dir, data_file, tmp_path,
                                                                                capsys):
    out = tmp_path / "streamed"
    assert train(tiny_model_dir, data_file, out, "--trainable", "last-blocks:1", "--lr", "auto", "--offload", "cpu",
                 steps=4) == 0
    assert "method.lr=auto takes the method's default lr 0.00025 with streamed blocks" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["lr"] == 2.5e-4


@pytest.mark.parametrize("extra, match", [(["--out", "EXISTS"], "is not empty"),
                                          (["--model", "nowhere/at-all"], "nowhere")])
def test_a_bad_input_is_refused_before_any_search(extra, match, tiny_model_dir, data_file, tmp_path, capsys):
    (tmp_path / "EXISTS").mkdir()
    (tmp_path / "EXISTS" / "mine.txt").write_text("a user's file")
    extra = [str(tmp_path / e) if e == "EXISTS" else e for e in extra]
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--trainable", "last-blocks:1",
            "--lr", "auto", *FAST, *extra]
    assert main(args) == 2
    err = capsys.readouterr()
    assert match in err.err and "lr search" not in err.out
