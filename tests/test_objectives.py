"""Non-differentiable objectives: ZO needs only values, so accuracy, F1 or any user function can be
what a run minimises."""

import json

import pytest
import torch

from zotune import ZOSGD
from zotune.cli import main
from zotune.config import ConfigError
from zotune.tasks import TaskConfig
from zotune.tasks.base import load_function
from zotune.tasks.classification import CLASS_OBJECTIVES as OBJECTIVES


def test_metric_objectives_are_one_minus_the_metric():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 0, 1])  # predictions 0, 1, 0, 1: 3 of 4 right
    assert float(OBJECTIVES["accuracy"](logits, labels)) == pytest.approx(0.25)
    # class 0: tp 2, predicted 2, true 3 -> F1 0.8; class 1: tp 1, predicted 2, true 1 -> 2/3
    assert float(OBJECTIVES["f1"](logits, labels)) == pytest.approx(1 - (0.8 + 2 / 3) / 2)
    expected = float(torch.nn.functional.cross_entropy(logits, labels))
    assert float(OBJECTIVES["loss"](logits, labels)) == pytest.approx(expected)


def test_zo_trains_a_classifier_on_its_error_rate_alone():
    """A linear classifier on two Gaussian blobs, minimising 1 − accuracy (a step function, no
    gradient anywhere): ZO's finite differences see the smoothed objective and it learns."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 2, generator=gen) + 1.5, torch.randn(200, 2, generator=gen) - 1.5])
    y = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    w = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) * -0.3  # starts almost all wrong
    opt = ZOSGD([w], lr=2.0, eps=0.1, seed=0)
    error = OBJECTIVES["accuracy"]
    start = float(error(x @ w.T, y))
    for step in range(300):
        rows = torch.randint(0, 400, (64,), generator=gen)
        opt.step(lambda: error(x[rows] @ w.T, y[rows]))
    assert start > 0.9 and float(error(x @ w.T, y)) < 0.1


def test_a_run_minimises_a_user_function_from_a_file(tiny_model_dir, data_file, tmp_path):
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "reward.py").write_text(
        "import json, torch\n"
        "def negative_margin(logits, labels):\n"
        "    value = -(logits.gather(1, labels[:, None]) - logits.logsumexp(1, keepdim=True)).mean()\n"
        f"    open({str(seen)!r}, 'a').write(json.dumps(float(value)) + '\\n')\n"
        "    return value\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--steps", "3",
                 "task.verbalizer={pos: great, neg: terrible}", "run.eval_every=0", "run.batch_size=4", "task.n_dev=4",
                 "task.n_test=8", f"task.objective={tmp_path / 'reward.py'}:negative_margin", "--method", "zosgd",
                 "--trainable", "final-norm"]) == 0  # (named: no trial, whose probes would call it too)
    values = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(values) == 6  # ZO-SGD's two probes a step, nothing else calls it
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss"] for r in rows if "loss" in r and "step" in r]
    assert losses[:3] == pytest.approx([(values[2 * i] + values[2 * i + 1]) / 2 for i in range(3)], rel=1e-6)


@pytest.mark.parametrize("spec,match", [("precision", "minimises loss, accuracy, f1, or a function"),
                                        ("no_such_module_x:f", "cannot import no_such_module_x"),
                                        ("math:no_such", "math has no function 'no_such'"),
                                        ("/nowhere/obj.py:f", "no file /nowhere/obj.py")])
def test_bad_objectives_are_refused_at_construction(spec, match):
    with pytest.raises(ConfigError, match=match):
        TaskConfig(objective=spec)
    assert load_function("math:sqrt", "task.objective")(4.0) == 2.0  # any importable callable
