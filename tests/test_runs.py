"""Runs that never lose work: kill -9 and resume, damaged files, a changed base, a second writer,
replay and export. Every check compares with an uninterrupted run of the same config."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main
from zotune.methods import StepRecord
from zotune.runs import RunFolder
from zotune.steplog import LOG_MAGIC, decode_steps, encode_step

# steps.log format 2: the magic, then 42 bytes a step (one direction, one group)
RECORD_START, RECORD = len(LOG_MAGIC), 42

STEPS = 24
OPTIONS = ["run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=5", "run.snapshot_every=7",
           "run.keep=last",  # these tests are about the last step's weights
           "run.device=cpu", "--lr", "1e-2", "task.verbalizer={pos: great, neg: terrible}",
           "model.trainable=last-blocks:2"]
LAST_TWO_AND_NORM = ("model.layers.1.", "model.layers.2.", "model.norm.")  # what last-blocks:2 trains


def args(model_dir, data, out, steps=STEPS):
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", str(steps), *OPTIONS]


def outcome(run):
    """Everything a finished run leaves that must not depend on interruptions."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds", None)
    summary = json.loads((run / "summary.json").read_text())
    final = load_file(run / "snapshots" / f"step-{STEPS:07d}.safetensors")
    return (run / "steps.log").read_bytes(), rows, summary["after"], summary["steps"], final


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(args(tiny_model_dir, data_file, out)) == 0
    return outcome(out)


def same(a, b):
    log_a, rows_a, after_a, steps_a, final_a = a
    log_b, rows_b, after_b, steps_b, final_b = b
    assert log_a == log_b  # seeds, projected gradients, lrs and losses, bit for bit
    assert rows_a == rows_b
    assert after_a == after_b and steps_a == steps_b
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def kill_and_resume(model_dir, data, out, rng):
    """Start a run, SIGKILL it at a random point, then resume it in this process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "zotune", *args(model_dir, data, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    target = rng.randrange(0, STEPS)
    log = out / "steps.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.stat().st_size >= RECORD_START + RECORD * target:
            break
        time.sleep(0.005)
    time.sleep(rng.random() * 0.05)  # land anywhere inside a step, a write or an evaluation
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not (out / "config.yaml").exists():  # killed before the run folder existed: start again
        assert main(args(model_dir, data, out)) == 0
        return
    code = main(["resume", str(out)])
    if code == 2:  # it finished before the kill landed
        assert json.loads((out / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("trial", range(3))
def test_kill_9_anywhere_then_resume_equals_uninterrupted(trial, tiny_model_dir, data_file, tmp_path, reference):
    out = tmp_path / "run"
    kill_and_resume(tiny_model_dir, data_file, out, random.Random(trial))
    same(outcome(out), reference)


@pytest.mark.slow
def test_kill_9_loop_long(tiny_model_dir, data_file, tmp_path, reference):
    rng = random.Random(1234)
    for trial in range(25):
        out = tmp_path / f"run{trial}"
        kill_and_resume(tiny_model_dir, data_file, out, rng)
        same(outcome(out), reference)


def interrupted_run(model_dir, data, out):
    """A run of 14 steps (snapshots at 7 and 14), to be resumed up to STEPS steps."""
    assert main(args(model_dir, data, out, steps=14)) == 0


RESUME = ["run.steps=%d" % STEPS]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_step_log_resumes_from_the_last_good_step(damage, tiny_model_dir, data_file, tmp_path, reference,
                                                          capsys):
    out = tmp_path / "run"
    interrupted_run(tiny_model_dir, data_file, out)
    log = out / "steps.log"
    data = bytearray(log.read_bytes())
    if damage == "flip":
        data[RECORD_START + RECORD * 9 + 20] ^= 0x10  # inside the record of step 10
    else:
        data = data[: RECORD_START + RECORD * 9 + 17]
    log.write_bytes(bytes(data))
    assert main(["resume", str(out), *RESUME]) == 0
    printed = capsys.readouterr().out
    problem = "corrupted (checksum mismatch)" if damage == "flip" else "truncated"
    assert "steps.log is " + problem + " after step 9" in printed
    assert "snapshot of step 7, then 2 steps replayed" in printed
    same(outcome(out), reference)


def test_a_finished_run_whose_log_lost_its_last_step_runs_it_again(tiny_model_dir, data_file, tmp_path, reference,
                                                                    capsys):
    """Not "already finished": the lost step runs again, to the same record, and the run finishes."""
    out = tmp_path / "run"
    assert main(args(tiny_model_dir, data_file, out)) == 0
    log = out / "steps.log"
    log.write_bytes(log.read_bytes()[:-5])  # the last record cut short (a copy that stopped, a full disk)
    assert main(["resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"steps.log is truncated after step {STEPS - 1}" in printed and "already finished" not in printed
    same(outcome(out), reference)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_snapshot_falls_back_to_an_older_one(damage, tiny_model_dir, data_file, tmp_path, reference, capsys):
    out = tmp_path / "run"
    interrupted_run(tiny_model_dir, data_file, out)
    snap = out / "snapshots" / "step-0000014.safetensors"
    data = bytearray(snap.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x01
    else:
        data = data[: len(data) // 2]
    snap.write_bytes(bytes(data))
    assert main(["resume", str(out), *RESUME]) == 0
    printed = capsys.readouterr().out
    assert "snapshot step-0000014.safetensors is damaged" in printed and "snapshot of step 7" in printed
    same(outcome(out), reference)


def test_damaged_metrics_line_is_rebuilt_from_the_log(tiny_model_dir, data_file, tmp_path, reference):
    out = tmp_path / "run"
    interrupted_run(tiny_model_dir, data_file, out)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    rows[5] = rows[5][:10]  # a damaged line inside the file
    (out / "metrics.jsonl").write_text("\n".join(rows[:-4]) + "\n" + rows[-4][:10])  # the kill cut a line
    assert main(["resume", str(out), *RESUME]) == 0
    same(outcome(out), reference)


def test_a_different_base_model_is_refused(tiny_model_dir, data_file, tmp_path, capsys):
    from conftest import tiny_model

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    interrupted_run(model_dir, data_file, out)
    tiny_model("llama", seed=1).save_pretrained(model_dir)
    before = (out / "steps.log").read_bytes()
    capsys.readouterr()
    assert main(["resume", str(out), *RESUME]) == 2
    assert "is not the one this run started from" in capsys.readouterr().err
    assert (out / "steps.log").read_bytes() == before


def test_a_second_writer_is_refused(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    interrupted_run(tiny_model_dir, data_file, out)
    holder = RunFolder(out, resume=True)
    try:
        capsys.readouterr()
        assert main(["resume", str(out), *RESUME]) == 2
        assert f"is in use by pid {os.getpid()}" in capsys.readouterr().err
    finally:
        holder.close()


def test_full_disk_stops_cleanly_and_resumes(tiny_model_dir, data_file, tmp_path, reference, monkeypatch):
    import errno

    out = tmp_path / "run"
    original = RunFolder.append_step

    def fill_up(self, step, record, loss):
        if step == 11:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, step, record, loss)
    monkeypatch.setattr(RunFolder, "append_step", fill_up)
    assert main(args(tiny_model_dir, data_file, out)) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 11" in summary["error"] and "disk is full" in summary["error"]
    assert len(decode_steps((out / "steps.log").read_bytes())[0]) == 10
    monkeypatch.setattr(RunFolder, "append_step", original)
    assert main(["resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def test_replay_and_export_rebuild_the_trained_model(tiny_model_dir, data_file, tmp_path, reference):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(args(tiny_model_dir, data_file, out)) == 0
    assert main(["replay", str(out), "--out", str(tmp_path / "replayed")]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    replayed = AutoModelForCausalLM.from_pretrained(tmp_path / "replayed")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    final = reference[4]
    trainable = [p for n, p in exported.named_parameters() if n.startswith(LAST_TWO_AND_NORM)]
    assert len(trainable) == len(final)
    assert all(torch.equal(p, final[f"t{i}"]) for i, p in enumerate(trainable))  # export == trained, bit for bit
    for a, b in zip(replayed.state_dict().values(), exported.state_dict().values()):
        assert torch.equal(a, b)  # the log alone gives the same weights
    ids = torch.tensor([[1, 500, 600, 700, 800]])
    with torch.inference_mode():
        assert torch.equal(replayed(ids).logits, exported(ids).logits)
        assert not torch.equal(base(ids).logits, exported(ids).logits)


def test_a_run_from_before_direction_formats_replays_with_its_own(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A run folder whose base.json names no direction format was drawn with format 1: resume, replay
    and export use format 1, so the weights are the trained ones (format 2 would give others)."""
    import zotune.session

    out = tmp_path / "run"
    monkeypatch.setattr(zotune.session, "DIRECTIONS_FORMAT", 1)
    assert main(args(tiny_model_dir, data_file, out, steps=6) + ["method.distribution=rademacher"]) == 0
    base = json.loads((out / "base.json").read_text())
    assert base.pop("directions") == 1
    (out / "base.json").write_text(json.dumps(base))  # as zotune wrote it before formats existed
    monkeypatch.undo()
    trained = load_file(out / "snapshots" / "step-0000006.safetensors")
    for snap in (out / "snapshots").glob("*.safetensors"):
        snap.unlink()  # only the log and the base are left: replay redraws every direction
    assert main(["replay", str(out), "--out", str(tmp_path / "replayed")]) == 0
    from transformers import AutoModelForCausalLM

    replayed = AutoModelForCausalLM.from_pretrained(tmp_path / "replayed")
    tensors = [p for n, p in replayed.named_parameters() if n.startswith(LAST_TWO_AND_NORM)]
    assert len(tensors) == len(trained)
    assert all(torch.equal(p, trained[f"t{i}"]) for i, p in enumerate(tensors))


def test_log_records_are_small():
    record = encode_step(20000, StepRecord(19999, 2**61, [0.123456789], [0.7], [1e-6]), 0.7)
    assert len(record) == 42 and len(record) * 20000 < 1_000_000
    assert "out of order" in decode_steps(LOG_MAGIC + record)[2]  # step 20000 where step 1 is expected


def test_a_multi_group_optimizer_replays_from_the_log(tmp_path):
    """Format 2 records every parameter group's lr, so a Python optimizer with groups of their own lr
    (and a schedule changing them) replays from steps.log alone, bit for bit."""
    from zotune import ZOSGD

    torch.manual_seed(0)
    start = [torch.randn(6, 5), torch.randn(5), torch.randn(4, 6)]
    target = [torch.randn_like(t) for t in start]

    def groups(ts):
        return [{"params": ts[:2], "lr": 1e-2}, {"params": ts[2:], "lr": 3e-3, "weight_decay": 0.1}]

    live = [t.clone() for t in start]
    opt = ZOSGD(groups(live), lr=1e-2, eps=1e-3, seed=4)
    (tmp_path / "config.yaml").write_text("run: {}\n")
    run = RunFolder(tmp_path / "run")
    for step in range(1, 7):
        opt.param_groups[1]["lr"] *= 0.5  # a schedule on the second group only
        opt.step(lambda: sum(float(((a - b) ** 2).sum()) for a, b in zip(live, target)))
        run.append_step(step, opt.last, 0.0)
    run.close()
    data = (tmp_path / "run" / "steps.log").read_bytes()
    assert data.startswith(LOG_MAGIC)
    records, _, problem = decode_steps(data)
    assert problem is None and [r.lrs for r in records] == [[1e-2, 3e-3 * 0.5 ** k] for k in range(1, 7)]
    replayed = [t.clone() for t in start]
    again = ZOSGD(groups(replayed), lr=1e-2, eps=1e-3, seed=4)
    for record in records:
        again.replay(record)
    assert all(torch.equal(a, b) for a, b in zip(live, replayed))


def test_a_format_1_log_stays_readable_and_grows_in_its_own_format(tmp_path):
    """Logs written before format 2 (no magic, one lr) are read as they are, and a resumed run appends
    format-1 records to them; a multi-group replay of such a log is refused with one line."""
    from zotune import ZOSGD
    from zotune.config import ConfigError

    old = [StepRecord(k, 1000 + k, [0.5 - k], [0.7], [1e-3]) for k in range(3)]
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("run: {}\n")
    (folder / "steps.log").write_bytes(b"".join(encode_step(k + 1, r, 0.7, log_format=1) for k, r in enumerate(old)))
    run = RunFolder(folder, resume=True)
    records, problem = run.read_steps()
    assert problem is None and [(r.seed, r.grads, r.lrs) for r in records] == [(r.seed, r.grads, r.lrs) for r in old]
    run.append_step(4, StepRecord(3, 1003, [0.1], [0.7], [1e-3, 5e-4]), 0.7)
    run.close()
    data = (folder / "steps.log").read_bytes()
    assert not data.startswith(LOG_MAGIC) and len(decode_steps(data)[0]) == 4
    two_groups = ZOSGD([{"params": [torch.zeros(3)]}, {"params": [torch.zeros(2)]}], lr=1e-3)
    with pytest.raises(ConfigError, match="records 1 learning rate"):
        two_groups.replay(records[0])
