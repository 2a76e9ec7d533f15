"""`zotune compare`: the same budget of forward passes for every run, one table and one plot."""

import json

from zotune.cli import main


def shared(model, data):
    return [f"model.name={model}", f"task.data={data}", "run.batch_size=4", "task.n_dev=4", "task.n_test=8",
            "run.device=cpu", "task.verbalizer={pos: great, neg: terrible}"]


def test_compare_gives_every_run_the_same_forward_budget(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--run", "zosgd method.lr=1e-3", "--run", "hizoo", "--run", "zosgd adapter.kind=lora",
            "--forwards", "24", "--evals", "2", "--out", str(out), *shared(tiny_model_dir, data_file)]
    assert main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["run"] for r in rows] == ["zosgd method.lr=1e-3", "hizoo", "zosgd adapter.kind=lora"]
    assert [(r["steps"], r["forwards"]) for r in rows] == [(12, 24), (8, 24), (12, 24)]  # hizoo: 3 forwards a step
    assert all([f for f, _ in r["dev"]] == [0, 12, 24] for r in rows)  # dev at the same forward counts
    assert (out / "compare.png").stat().st_size > 0 and "| hizoo | 24 | 8 |" in (out / "compare.md").read_text()


def test_a_bad_run_is_refused_before_any_run_starts(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--run", "zosgd", "--run", "zoadam method.beta1=2", "--forwards", "24", "--out", str(out),
            *shared(tiny_model_dir, data_file)]
    assert main(argv) == 2
    assert "method.beta1=2" in capsys.readouterr().err and not out.exists()
    assert main(["compare", "--run", "sgd", "--out", str(out), *shared(tiny_model_dir, data_file)]) == 2
    assert "'sgd' is not a method" in capsys.readouterr().err
