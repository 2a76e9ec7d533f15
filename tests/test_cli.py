"""`zotune train` end to end on a tiny model and tiny data files, and every bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from zotune.cli import main

FAST = ["run.eval_every=2", "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.device=cpu",
        "model.trainable=last-blocks:2"]  # blocks train (the default trains the final norm alone)


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return path


@pytest.fixture
def data_file(tmp_path):
    rows = [(f"film {i} was {'wonderful' if i % 2 else 'awful'}", "pos" if i % 2 else "neg") for i in range(40)]
    return write_csv(tmp_path / "reviews.csv", rows)


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
            "task.verbalizer={pos: great, neg: terrible}", *FAST, *extra]


def test_train_end_to_end_writes_the_run_folder(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, "--steps", "5", "--lr", "1e-2")) == 0
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "fine-tuned" in printed
    assert {"config.yaml", "metrics.jsonl", "summary.json", "curve.png"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["status"] == "finished"
    assert 0 <= summary["before"]["accuracy"] <= 1 and 0 <= summary["after"]["accuracy"] <= 1
    assert summary["seconds"] > 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["lr"] == 1e-2 and config["run"]["steps"] == 5
    assert config["task"]["verbalizer"] == {"pos": "great", "neg": "terrible"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(isinstance(r["seed"], int) and len(r["grads"]) == 1 for r in steps)
    assert [r["step"] for r in rows if "dev_accuracy" in r] == [0, 2, 4, 5]
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_yaml_config_then_overrides_then_flags(tiny_model_dir, data_file, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"method": {"lr": 0.5, "eps": 0.01}, "run": {"steps": 9}}))
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, "--config", str(cfg), "run.steps=2", "--lr", "1e-3")) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["method"]["lr"], config["method"]["eps"], config["run"]["steps"]) == (1e-3, 0.01, 2)


def test_the_method_and_run_defaults_follow_what_trains(tmp_path):
    """The default job is the measured probe recipe (docs/compare.md); naming blocks or an adapter
    never inherits its lr of 0.2, which would wreck 7M block values, and a method not measured on
    the final norm keeps its own lr."""
    from zotune.resolve import resolve_configs

    def defaults(*overrides, config=None):
        cfgs = resolve_configs(config, overrides)
        method, run = cfgs["method"], cfgs["run"]
        return cfgs["model"].trainable, method.name, method.lr, run.steps, run.batch_size, run.eval_every

    probe = ("final-norm", "fzoo", 0.2, 800, 64, 400)
    assert defaults() == defaults("model.trainable=final-norm") == probe
    assert resolve_configs()["task"].template == "Review: {text}\nSentiment:"
    assert defaults("model.trainable=last-blocks:2") == ("last-blocks:2", "lozo", 2.5e-4, 1200, 16, 300)
    assert defaults("model.trainable=all")[1:] == ("lozo", 2.5e-4, 1200, 16, 300)
    assert defaults("adapter.kind=lora")[1:] == ("lozo", 2.5e-4, 1200, 16, 300)  # LoRA's tensors train
    assert defaults("method.name=zosgd") == ("final-norm", "zosgd", 0.2, 800, 64, 400)  # measured on the probe too
    assert defaults("method.name=zoadam")[1:3] == ("zoadam", 5e-4)  # not measured there: its own lr
    assert defaults("run.steps=10", "method.lr=0.1") == ("final-norm", "fzoo", 0.1, 10, 64, 400)
    cfg = tmp_path / "blocks.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"trainable": "last-blocks:1"}}))
    assert defaults(config=cfg)[1:3] == ("lozo", 2.5e-4)
    assert defaults("model.trainable=final-norm", config=cfg) == probe  # the command line decides


def error_of(args, capsys):
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("zotune: error: ")
    return err[0]


def test_missing_model_path(data_file, tmp_path, capsys):
    err = error_of(train_args(tmp_path / "no-such-model", data_file, tmp_path / "r"), capsys)
    assert "does not exist" in err and "no-such-model" in err


def test_missing_empty_and_columnless_data(tiny_model_dir, tmp_path, capsys):
    err = error_of(train_args(tiny_model_dir, tmp_path / "nope.csv", tmp_path / "r1"), capsys)
    assert "nope.csv does not exist" in err
    assert not (tmp_path / "r1").exists()  # nothing written: the fixed command can use the same --out
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert "has no rows" in error_of(train_args(tiny_model_dir, empty, tmp_path / "r2"), capsys)
    wrong = write_csv(tmp_path / "wrong.csv", [("a", "pos")], header="review,label")
    err = error_of(train_args(tiny_model_dir, wrong, tmp_path / "r3"), capsys)
    assert "wrong.csv:2: task.template field {text} is not in the row (has: review, label)" in err
    assert "task.text_column" in err


def test_label_without_verbalizer(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", [("good", "pos"), ("bad", "neg"), ("meh", "neutral")] * 10)
    err = error_of(train_args(tiny_model_dir, data, tmp_path / "r"), capsys)
    assert "'neutral'" in err and "task.verbalizer" in err
    fixed = write_csv(tmp_path / "fixed.csv", [("good", "pos"), ("bad", "neg")] * 10)
    assert main(train_args(tiny_model_dir, fixed, tmp_path / "r", "--steps", "1")) == 0  # the same --out


@pytest.mark.parametrize("override,match", [
    ("method.eps=0", "method.eps"), ("method.eps=-1e-3", "method.eps"), ("method.lr=-1", "method.lr"),
    ("method.lr=abc", "not a float"), ("run.steps=-3", "run.steps"), ("method.lrr=1", "unknown option method.lrr"),
    ("model.trainable=half", "model.trainable"), ("task.template={text} {lable}", "field {lable} is not in the row"),
    ("oops=1", "section.key=value"), ("optim.lr=1", "unknown config section"),
])
def test_invalid_values_refused_before_step_0(override, match, tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "r"
    assert match in error_of(train_args(tiny_model_dir, data_file, out, override), capsys)
    assert not (out / "metrics.jsonl").exists()


def test_existing_run_folder_is_never_overwritten(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, "--steps", "1")) == 0
    before = (out / "summary.json").read_text()
    assert "already holds a run" in error_of(train_args(tiny_model_dir, data_file, out, "--steps", "1"), capsys)
    assert (out / "summary.json").read_text() == before


def test_non_finite_loss_stops_naming_the_step(tiny_model_dir, data_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.model.norm.weight.data[0] = float("nan")  # what a diverged fp16 run leaves behind
    model.save_pretrained(broken)
    for f in tiny_model_dir.glob("tokenizer*"):
        (broken / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    assert main(train_args(broken, data_file, out, "--steps", "5")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("step 1: loss is not finite")
    assert "stopped: step 1" in capsys.readouterr().out
    assert (out / "config.yaml").exists() and (out / "curve.png").exists()


def test_ctrl_c_stops_cleanly_and_keeps_the_log(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:  # files: never a full pipe
        proc = subprocess.Popen([sys.executable, "-m", "zotune",
                                 *train_args(tiny_model_dir, data_file, out, "--steps", "100000")],
                                stdout=so, stderr=se, text=True, env=env,
                                # a suite started in the background has SIGINT ignored, and children inherit that
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not metrics.exists() or metrics.read_text().count('"loss"') < 3):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        finally:
            proc.kill()  # a run that did not stop must not outlive the test
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert "stopping after this step" in stderr
    assert proc.returncode == 130, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] >= 3
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, summary["steps"] + 1))
    assert "status interrupted" in stdout


def test_kept_prefix_outputs_give_the_same_run_as_recomputing(tiny_model_dir, data_file, tmp_path):
    def losses(out, *extra):
        assert main(train_args(tiny_model_dir, data_file, out, "--steps", "16", "--lr", "1e-2", *extra)) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["loss"], r["grads"], r["seed"]) for r in rows if "loss" in r]
    # 28 training examples in batches of 4: 16 steps revisit every batch at least twice.
    kept = losses(tmp_path / "kept")
    recomputed = losses(tmp_path / "recomputed", "run.prefix_cache_mb=0")
    assert kept == recomputed


def test_bench_step_prints_both_ratios_as_json(capsys):
    assert main(["bench", "step", "--shape", "tiny", "--batch", "2", "--seq", "16", "--repeats", "1", "--json",
                 "--no-task"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["zotune_ratio"] > 0 and result["mezo_ratio"] > 0 and result["shape"] == "tiny"


def test_bench_probe_times_the_whole_forward_and_the_tail_on_the_same_step(capsys):
    assert main(["bench", "probe", "--shape", "tiny", "--batch", "4", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tail"] == "every block is frozen: probes run only model.decoder.final_layer_norm -> lm_head"
    assert result["step_tail_s"] > 0 and result["tail_speedup"] > 0 and result["vocab"] == 50272


@pytest.mark.parametrize("method", ["zosgd", "zoadam"])
def test_bench_stream_times_the_three_placements_of_one_method_on_the_same_loss(method, tmp_path):
    from zotune.bench.stream import run_time_bench

    result = run_time_bench("tiny", 2, 16, 2, "all", tmp_path, log=lambda *a: None, method=method)
    assert result["same_loss"]  # resident, RAM tier and disk tier took the same steps
    assert result["disk_tier_time_ratio"] > 0 and result["ram_tier_time_ratio"] > 0
    if method == "zoadam":  # the moments of the disk tier's blocks were in their state files
        assert list(tmp_path.glob("time-disk/block-*.state-*.safetensors"))


def test_bench_stream_compares_an_int4_base_with_a_float_one_in_bytes_moved(tmp_path):
    from zotune.bench.stream import run_quant_bench

    result = run_quant_bench("tiny", 2, 16, 2, tmp_path, log=lambda *a: None)
    # the frozen int4 blocks are read in about a fifth of the bytes; the float trained block is the same
    assert 0 < result["int4_over_float_bytes_read"] < 0.75 and result["int4_base_step_s"] > 0
    assert result["int4_base_written_mb_per_step"] == result["float32_base_written_mb_per_step"] > 0


def test_a_16_bit_model_trains_float32_masters_resident_as_streamed(tiny_model_dir, data_file, tmp_path, capsys):
    """model.dtype=bfloat16: every trained tensor has a float32 master, the model's bf16 tensors read their
    rounding. Resident (masters beside the model), streamed from host memory or disk (block masters on the
    tier, the final norm's on the device): the same step log and the same masters, bit for bit, each
    stopped and resumed; updates far below bf16's resolution survive."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from zotune.models import select_trainable

    def args(out, steps, *extra):
        return ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--steps",
                str(steps), "--dtype", "bfloat16", "--trainable", "last-blocks:1", "--lr", "1e-7", "run.batch_size=4",
                "task.n_dev=4", "task.n_test=8", "run.eval_every=0", "run.snapshot_every=2", "run.device=cpu",
                "task.verbalizer={pos: great, neg: terrible}", *extra]
    assert main(args(tmp_path / "whole", 4)) == 0
    assert "trained tensors kept as float32 masters beside the model" in capsys.readouterr().out
    tiers = {"parts": [], "ram": ["--offload", "cpu"],
             "disk": ["--offload", "disk", "--offload-dir", str(tmp_path / "b")]}
    for name, tier in tiers.items():  # stopped after 2 steps, resumed to 4
        assert main(args(tmp_path / name, 2, *tier)) == 0
        assert main(["resume", str(tmp_path / name), "run.steps=4"]) == 0
    whole = (tmp_path / "whole" / "steps.log").read_bytes()
    assert all((tmp_path / name / "steps.log").read_bytes() == whole for name in tiers)
    final = load_file(tmp_path / "whole" / "snapshots" / "step-0000004.safetensors")
    for name in ("parts", "ram"):  # (a disk tier's snapshots hold the final norm alone: its blocks are on disk)
        other = load_file(tmp_path / name / "snapshots" / "step-0000004.safetensors")
        assert final.keys() == other.keys() and all(torch.equal(final[k], other[k]) for k in final), name
    disk = load_file(tmp_path / "disk" / "snapshots" / "step-0000004.safetensors")
    assert len(disk) == 1 and torch.equal(disk["t0"], final[f"t{len(final) - 1}"])  # the final norm's master

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    start = torch.cat([p.detach().float().view(-1) for _, p in select_trainable(base, "last-blocks:1")])
    trained = torch.cat([final[f"t{i}"].view(-1) for i in range(len(final))])
    assert trained.dtype == torch.float32
    assert (trained != start).float().mean() > 0.9  # nearly every master moved ...
    assert (trained.bfloat16() != start.bfloat16()).float().mean() < 0.05  # ... by less than bf16 can show


def test_a_16_bit_run_from_before_masters_resumes_as_it_was_trained(tiny_model_dir, data_file, tmp_path, capsys):
    """A run folder whose base.json predates float32 masters keeps training its 16-bit tensors in place (its
    step log was made that way), and says so."""
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, out, "--steps", "1", "--dtype", "bfloat16")) == 0
    base = json.loads((out / "base.json").read_text())
    assert base.pop("float32_masters") is True
    (out / "base.json").write_text(json.dumps(base))
    capsys.readouterr()
    assert main(["resume", str(out), "run.steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "started before float32 masters" in printed and "float32 masters beside" not in printed


def test_bench_task_part_reports_ratios_and_tokens_per_second(tokenizer):
    from zotune.bench.step import run_task_bench

    result = run_task_bench(repeats=1, log=lambda *a: None)
    assert result["task_step_kept_ratio"] < result["task_step_recomputed_ratio"] < result["task_step_full_ratio"]
    assert result["train_tokens_per_s"] > 0 and result["eval_tokens_per_s"] > 0


def test_group_by_length_batches_similar_lengths_and_every_example_once_an_epoch():
    from zotune.schedule import batch_order as _batches

    lengths = [5 + (i * 37) % 91 for i in range(200)]
    spread = {}
    for grouped in (False, True):
        order = _batches(200, 8, 0, lengths if grouped else None)
        epoch = [next(order) for _ in range(25)]
        assert sorted(i for _, b in epoch for i in b) == list(range(200))
        assert sorted(map(tuple, (b for _, b in epoch))) == sorted(map(tuple, (next(order)[1] for _ in range(25))))
        spread[grouped] = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for _, b in epoch) / 25
    assert spread[True] < spread[False] / 5  # fixed batches, each of similar lengths


def test_a_run_from_before_group_by_length_resumes_with_its_own_batches(tiny_model_dir, tmp_path):
    """A config.yaml that does not name run.group_by_length was trained with random batches: resume
    keeps them, so the log equals an uninterrupted run's (grouped batches would give other gradients)."""
    rows = [(f"film {'very ' * (i % 9)}{i} was {'wonderful' if i % 2 else 'awful'}", "pos" if i % 2 else "neg")
            for i in range(60)]
    data = write_csv(tmp_path / "varied.csv", rows)
    plain = ["run.group_by_length=false", "run.eval_every=0"]
    assert main(train_args(tiny_model_dir, data, tmp_path / "whole", "--steps", "8", *plain)) == 0
    assert main(train_args(tiny_model_dir, data, tmp_path / "grouped", "--steps", "8", "run.eval_every=0")) == 0
    old = tmp_path / "old"
    assert main(train_args(tiny_model_dir, data, old, "--steps", "4", *plain)) == 0
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["run"]["group_by_length"]  # as zotune wrote it before the setting existed
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["resume", str(old), "run.steps=8"]) == 0
    log = (old / "steps.log").read_bytes()
    assert log == (tmp_path / "whole" / "steps.log").read_bytes()
    assert log != (tmp_path / "grouped" / "steps.log").read_bytes()


def test_eval_a_model_and_a_run_folder(tiny_model_dir, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, run, "--steps", "6", "--lr", "1e-2", "run.keep=last")) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "at step 6" in out and "test" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["step"] == 6 and result["splits"]["test"] == summary["after"]  # the run's own final evaluation

    base_json = tmp_path / "base.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(base_json),
                 "task.verbalizer={pos: great, neg: terrible}", "task.n_dev=4", "task.n_test=8"]) == 0
    base = json.loads(base_json.read_text())
    assert base["run"] is None and base["splits"]["test"] == summary["before"] and base["splits"]["dev"]["n"] == 4


def test_eval_refuses_bad_input(tiny_model_dir, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data_file, run, "--steps", "2")) == 0
    assert main(["eval", "--model", str(run), "method.lr=1"]) == 2
    assert "pass only task.* or run.*" in capsys.readouterr().err
    assert main(["eval", "--model", str(run), "--split", "valid"]) == 2
    assert "choose from dev, test, train" in capsys.readouterr().err


def test_report_to_a_tracker_copies_the_metrics(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    """W&B through a stand-in module (the real one is never required): every step's loss and each
    evaluation arrive keyed by step; a tracker that is not installed or not known stops the run."""
    import types

    logged, finished = [], []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            finished.append(True)

    fake = types.SimpleNamespace(init=lambda **kwargs: FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "run", "--steps", "4", "run.report_to=wandb")) == 0
    steps_with_loss = [step for step, values in logged if "loss" in values]
    assert steps_with_loss == [1, 2, 3, 4] and finished == [True]
    assert any("dev_accuracy" in v for _, v in logged) and sum("test_accuracy" in v for _, v in logged) == 2

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "tb", "--steps", "1",
                           "run.report_to=tensorboard")) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "x", "--steps", "1", "run.report_to=mlflow")) == 2
    assert "'mlflow' is not a tracker" in capsys.readouterr().err


@pytest.mark.parametrize("setup", [["adapter.kind=lora", "adapter.r=4"], ["--offload", "disk"]])
def test_eval_of_lora_and_disk_tier_runs_equals_their_final_evaluation(setup, tiny_model_dir, data_file, tmp_path):
    run = tmp_path / "run"
    extra = [f"--offload-dir={tmp_path / 'blocks'}"] if "--offload" in setup else []
    assert main(train_args(tiny_model_dir, data_file, run, "--steps", "4", "--lr", "1e-2", *setup, *extra)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", "--model", str(run), "--split", "test"]) == 0
    assert json.loads((run / "eval.json").read_text())["splits"]["test"] == summary["after"]


def test_a_key_given_twice_is_named_once_and_the_last_one_counts(capsys):
    from zotune.resolve import resolve_configs

    cfgs = resolve_configs(None, ["method.eps=1e-3", "method.eps=1e-2"], {"method": {"lr": 0.5}},
                           task="rotten_tomatoes")
    assert cfgs["method"].eps == 1e-2
    assert "method.eps is given twice ('1e-3', then '1e-2'): the last one counts" in capsys.readouterr().out
    cfgs = resolve_configs(None, ["method.lr=0.1"], {"method": {"lr": 0.5}})
    assert cfgs["method"].lr == 0.5 and "the flag counts" in capsys.readouterr().out
