"""Distributed ZO on gloo, with spawned processes: N ranks == 1 rank, faults, bad dims.

Ranks are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), but without its
agent, so that a killed rank is seen by its peers, not cleaned up by the launcher.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main

STEPS = 6
OPTIONS = ["run.batch_size=8", "task.n_dev=4", "task.n_test=8", "run.eval_every=3", "run.device=cpu", "run.threads=1",
           "--lr", "1e-2", "task.verbalizer={pos: great, neg: terrible}", "--trainable", "all",
           "--method", "zosgd"]  # the tolerances below are ZO-SGD's at this lr; a later --method replaces it


def train_args(model, data, out, *extra, steps=STEPS):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
            *OPTIONS, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n, argv, log_dir, entry=("-m", "zotune")):
    port = free_port()
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TQDM_DISABLE": "1"}
        out = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *entry, *argv], env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs, timeout=300):
    return [p.wait(timeout=timeout) for p in procs]


def step_losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "grads" in r]


def final(run):
    return load_file(sorted((run / "snapshots").glob("step-*.safetensors"))[-1])


@pytest.fixture(scope="module")
def single(tiny_model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(train_args(tiny_model_dir, data_file, out)) == 0
    return out


def test_perturbation_parallel_equals_one_process_bit_for_bit(single, tiny_model_dir, data_file, tmp_path):
    """P = 2: each rank runs one probe's forward on the whole batch; one float each is exchanged."""
    out = tmp_path / "run"
    assert wait_all(launch(2, train_args(tiny_model_dir, data_file, out, "parallel.perturb=2"), tmp_path)) == [0, 0]
    assert (out / "steps.log").read_bytes() == (single / "steps.log").read_bytes()
    a, b = final(single), final(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dims", [dict(data=2, perturb=1), dict(data=4, perturb=1), dict(data=2, perturb=2)])
def test_data_and_2d_parallel_equal_one_process_within_rounding(dims, single, tiny_model_dir, data_file, tmp_path):
    """D ranks x batch 8/D == 1 process x batch 8. Not bit for bit: each rank's forward runs on fewer,
    differently padded rows (other matrix shapes, other float rounding, about 1e-6 in the loss) and
    the batch loss is a weighted sum of shard means instead of one mean; g = ΔL/2ε magnifies that
    by 1/2ε = 500 (g agrees to about 1e-4). After 6 steps at lr 1e-2 the weights (|w| up to 1.2)
    agree to 1e-4; measured 1.2e-5 for D = 2."""
    out = tmp_path / "run"
    n = dims["data"] * dims["perturb"]
    argv = train_args(tiny_model_dir, data_file, out, f"parallel.data={dims['data']}",
                      f"parallel.perturb={dims['perturb']}")
    assert wait_all(launch(n, argv, tmp_path)) == [0] * n
    assert step_losses(out) == pytest.approx(step_losses(single), rel=1e-4)
    a, b = final(single), final(out)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)
    assert (out / "summary.json").exists() and not (tmp_path / "rank1.log").read_text().count("run folder:")


def test_more_data_ranks_than_rows_in_a_batch_equal_one_process(tiny_model_dir, data_file, tmp_path):
    """parallel.data=2 with run.batch_size=1: the rank with no rows runs no forward (and no frozen
    prefix) and adds nothing to the loss, so the run is the one-process run, bit for bit."""
    probe = ["run.batch_size=1", "--trainable", "last-blocks:1"]  # a frozen prefix below the trained block
    alone = tmp_path / "alone"
    assert main(train_args(tiny_model_dir, data_file, alone, *probe, steps=3)) == 0
    out = tmp_path / "run"
    assert wait_all(launch(2, train_args(tiny_model_dir, data_file, out, *probe, "parallel.data=2", steps=3),
                           tmp_path)) == [0, 0]
    assert (out / "steps.log").read_bytes() == (alone / "steps.log").read_bytes()


def test_a_killed_rank_stops_the_others_with_a_clear_error(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    argv = train_args(tiny_model_dir, data_file, out, "parallel.data=2", "parallel.timeout=60", "run.eval_every=0",
                      steps=100000)
    procs = launch(2, argv, tmp_path)
    deadline = time.time() + 120
    log = out / "steps.log"
    while time.time() < deadline and not (log.exists() and log.stat().st_size > 8 + 42 * 3):
        time.sleep(0.05)
    started = time.time()
    procs[1].send_signal(signal.SIGKILL)
    assert procs[0].wait(timeout=120) == 1
    assert time.time() - started < 60  # well before the collective timeout
    text = (tmp_path / "rank0.log").read_text()
    assert "zotune: error:" in text or "status failed" in text
    assert "another rank stopped" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] >= 3


def test_dims_that_do_not_match_the_world_are_refused_before_any_work(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, data_file, tmp_path / "a", "parallel.data=2")) == 2
    assert "parallel.data=2 x parallel.perturb=1 = 2 processes, but 1 were started" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    procs = launch(2, train_args(tiny_model_dir, data_file, tmp_path / "b", "parallel.data=4"), tmp_path)
    assert wait_all(procs, timeout=120) == [2, 2]
    assert "4 processes, but 2 were started" in (tmp_path / "rank0.log").read_text()
    assert not (tmp_path / "b").exists()


def test_under_torchrun_auto_is_the_probe_on_every_rank_and_no_rank_runs_a_trial(tiny_model_dir, data_file,
                                                                                  tmp_path):
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "run"),
            "--steps", "2", "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.device=cpu", "run.threads=1",
            "task.verbalizer={pos: great, neg: terrible}", "parallel.data=2"]
    assert wait_all(launch(2, argv, tmp_path)) == [0, 0]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert "trial:" not in logs[0] + logs[1]
    assert "trains the final norm under torchrun" in logs[0] and "trains the final norm" not in logs[1]


def test_zotune_launch_ends_a_refused_run_with_one_line_per_rank_and_exit_2(tiny_model_dir, data_file, tmp_path):
    """torchrun would add a traceback and a ~40-line report and exit 1; `zotune launch` keeps the ranks' lines."""
    argv = ["launch", "--nproc-per-node", "2", "--standalone",
            *train_args(tiny_model_dir, data_file, tmp_path / "r", "parallel.data=4")]
    done = subprocess.run([sys.executable, "-m", "zotune", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("zotune: error: parallel.data=4 x parallel.perturb=1 = 4 "
                                                   "processes, but 2 were started") for line in lines), lines
    assert not (tmp_path / "r").exists()
    no_verb = subprocess.run([sys.executable, "-m", "zotune", "launch", "--nproc-per-node", "2"], capture_output=True,
                             text=True, timeout=60)
    assert no_verb.returncode == 2 and "needs a command after the torchrun options" in no_verb.stderr


@pytest.mark.parametrize("method", [
    ["--method", "lozo-m", "method.interval=2", "method.n_directions=2"],
    # AdaZeta's query schedule: 1, 1, 2, 2, 3, 3 directions, so each step splits its own probes over the ranks
    ["--method", "zosgd", "method.n_directions_max=3", "method.query_beta=1", "method.query_every=2"],
], ids=["lozo-m", "query-schedule"])
def test_lozo_m_perturbation_parallel_equals_one_process_bit_for_bit(method, tiny_model_dir, data_file, tmp_path):
    """A method with its own directions and state (LOZO-M: low-rank U·Vᵀ, V shared by 2 steps, its
    momentum in the rank-r space) on P = 2: each rank runs its probes, one float each is exchanged."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_args(tiny_model_dir, data_file, one, *method)) == 0
    assert wait_all(launch(2, train_args(tiny_model_dir, data_file, two, "parallel.perturb=2", *method),
                           tmp_path)) == [0, 0]
    assert (two / "steps.log").read_bytes() == (one / "steps.log").read_bytes()
    a, b = final(one), final(two)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", [[], ["--method", "zoadam"], ["--method", "lozo-m", "method.interval=2"]],
                         ids=["zosgd", "zoadam", "lozo-m"])
def test_disk_streaming_with_sliced_reads_equals_resident_on_two_ranks(method, tiny_model_dir, data_file, tmp_path):
    """data = 2 with the disk tier: each rank reads half of every block and gathers the other half
    (with Adam, both ranks write the same moments to the blocks' state files); the run is the same,
    bit for bit, as data = 2 with resident weights."""
    resident, streamed = tmp_path / "resident", tmp_path / "streamed"
    argv = train_args(tiny_model_dir, data_file, resident, "parallel.data=2", *method)
    assert wait_all(launch(2, argv, tmp_path)) == [0, 0]
    argv = train_args(tiny_model_dir, data_file, streamed, "parallel.data=2", "--offload", "disk",
                      "--offload-dir", str(tmp_path / "blocks"), *method)
    assert wait_all(launch(2, argv, tmp_path)) == [0, 0]
    assert (streamed / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()


def test_a_parallel_run_resumes_exactly(tiny_model_dir, data_file, tmp_path):
    """2 x 2 ranks: 3 steps, then `zotune resume` to 6 == 6 steps in one go (the same dims)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    dims = ["parallel.data=2", "parallel.perturb=2"]
    assert wait_all(launch(4, train_args(tiny_model_dir, data_file, whole, *dims), tmp_path)) == [0] * 4
    assert wait_all(launch(4, train_args(tiny_model_dir, data_file, parts, *dims, steps=3), tmp_path)) == [0] * 4
    assert wait_all(launch(4, ["resume", str(parts), f"run.steps={STEPS}"], tmp_path)) == [0] * 4
    assert (parts / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()
    a, b = final(whole), final(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
