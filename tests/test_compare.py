"""`zotune compare`: the same budget of forward passes for every run, one table and one plot."""

import json

from zotune.cli import main


def shared(model, data):
    return [f"model.name={model}", f"task.data={data}", "run.batch_size=4", "task.n_dev=4", "task.n_test=8",
            "run.device=cpu", "task.verbalizer={pos: great, neg: terrible}", "model.trainable=last-blocks:2"]


def test_compare_gives_every_run_the_same_forward_budget(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--run", "zosgd method.lr=1e-3", "--run", "hizoo", "--run", "zosgd adapter.kind=lora",
            "--forwards", "24", "--evals", "2", "--out", str(out), *shared(tiny_model_dir, data_file)]
    assert main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["run"] for r in rows] == ["zosgd method.lr=1e-3", "hizoo", "zosgd adapter.kind=lora"]
    assert [(r["steps"], r["forwards"]) for r in rows] == [(12, 24), (8, 24), (12, 24)]  # hizoo: 3 forwards a step
    assert all([f for f, _ in r["dev"]] == [0, 12, 24] for r in rows)  # dev at the same forward counts
    assert (out / "compare.png").stat().st_size > 0 and "| hizoo | 1 | 24 | 8 |" in (out / "compare.md").read_text()
    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table[:3]}) == 1  # header, rule and rows: the same columns


def test_a_bad_run_is_refused_before_any_run_starts(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--run", "zosgd", "--run", "zoadam method.beta1=2", "--forwards", "24", "--out", str(out),
            *shared(tiny_model_dir, data_file)]
    assert main(argv) == 2
    assert "method.beta1=2" in capsys.readouterr().err and not out.exists()
    assert main(["compare", "--run", "sgd", "--out", str(out), *shared(tiny_model_dir, data_file)]) == 2
    assert "'sgd' is not a method" in capsys.readouterr().err


def test_compare_over_seeds_reports_mean_spread_and_forwards_to_a_target(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--run", "zosgd method.lr=1e-2", "--run", "fzoo method.lr=1e-2 method.n_directions=2",
            "--forwards", "24", "--evals", "2", "--seeds", "0,1", "--target", "0.0", "--out", str(out),
            *shared(tiny_model_dir, data_file)]
    assert main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [(r["run"].split()[0], r["seed"]) for r in rows] == [("zosgd", 0), ("zosgd", 1), ("fzoo", 0), ("fzoo", 1)]
    assert rows[0]["dev"] != rows[1]["dev"] or rows[0]["test_after"] != rows[1]["test_after"] or \
        (out / "01-zosgd-seed0" / "steps.log").read_bytes() != (out / "01-zosgd-seed1" / "steps.log").read_bytes()
    assert all(r["reached"] == 0 for r in rows)  # a target of 0 is reached at the first evaluation
    md = (out / "compare.md").read_text()
    assert "| zosgd method.lr=1e-2 | 2 | 24 | 12 |" in md and " ± " in md and "forwards to dev accuracy >= 0.0" in md
    assert "| fzoo method.lr=1e-2 method.n_directions=2 | 2 | 24 | 8 |" in md  # 3 forwards a step
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table[:4]}) == 1  # header, rule and rows: the same columns


def test_compare_refuses_bad_seeds(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(["compare", "--run", "zosgd", "--seeds", "0,x", "--out", str(tmp_path / "c"),
                 *shared(tiny_model_dir, data_file)]) == 2
    assert "--seeds '0,x'" in capsys.readouterr().err
    assert main(["compare", "--run", "zosgd", "--seeds", "1,1", "--out", str(tmp_path / "c"),
                 *shared(tiny_model_dir, data_file)]) == 2
    assert "distinct seeds" in capsys.readouterr().err


def test_a_query_schedule_is_counted_and_plotted_at_its_own_forward_passes(tiny_model_dir, data_file, tmp_path):
    from zotune.resolve import resolve_configs

    out = tmp_path / "cmp"
    schedule = "zosgd method.n_directions_max=3 method.query_every=2"
    assert main(["compare", "--run", schedule, "--forwards", "24", "--evals", "2", "--out", str(out),
                 *shared(tiny_model_dir, data_file)]) == 0
    (row,) = json.loads((out / "compare.json").read_text())
    method = resolve_configs(None, ["method.name=zosgd", "method.n_directions_max=3", "method.query_every=2"])["method"]
    steps = row["steps"]
    assert method.forwards_in(steps) <= 24 < method.forwards_in(steps + 1)
    assert row["forwards"] == method.forwards_in(steps)
    assert row["forwards"] != steps * 2  # the steps grew: not the first step's forwards times the steps
    every = steps // 2  # evaluations at equal steps (and after the last), each at its own forward count
    at = dict.fromkeys([0, every, 2 * every, steps])
    assert [f for f, _ in row["dev"]] == [method.forwards_in(s) for s in at]
