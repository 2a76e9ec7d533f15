"""`zotune bench first-order`: the backprop reference trains what `zotune train` trains, on the same batches."""

import json

import torch

from zotune.cli import main


def test_first_order_reference_learns_the_tiny_task_through_the_frozen_prefix(tiny_model_dir, data_file, capsys):
    args = ["bench", "first-order", "--lr", "3e-3", "--json", f"model.name={tiny_model_dir}", f"task.data={data_file}",
            "task.verbalizer={pos: great, neg: terrible}", "model.trainable=last-blocks:1", "run.steps=40",
            "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=20", "run.device=cpu"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 40 and result["metric"] == "accuracy" and [s for s, _ in result["dev"]] == [0, 20, 40]
    assert result["final_train_loss"] < 0.5  # log 2 = 0.69 at chance: it fits the training batches


def test_the_prefix_output_is_made_fit_for_autograd():
    """A captured prefix output is an inference tensor: the reference clones it, so backprop can save it."""
    from zotune.bench.first_order import _detached

    with torch.inference_mode():
        captured = (torch.ones(2, 3), torch.zeros(1))
    x = _detached(captured)
    w = torch.ones(3, requires_grad=True)
    (x[0] * w).sum().backward()  # an inference tensor here would raise
    assert torch.equal(w.grad, torch.full((3,), 2.0)) and not x[0].is_inference()
