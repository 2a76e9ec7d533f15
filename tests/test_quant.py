"""Quantized bases: int8 block linears with a float scale per row; ZO on the scales (QZO) or on a
float subset; runs that resume exactly and export a standard model."""

import json

import pytest
import torch
from torch import nn

from conftest import tiny_model
from zotune import ZOSGD
from zotune.cli import main
from zotune.models import select_trainable
from zotune.quant import Int8Linear, dequantize_, quantize_


def test_an_int8_linear_is_its_dequantized_weight_within_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    q = Int8Linear(linear)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (24,)
    assert ((linear.weight - q.weight_value()).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 48)
    assert torch.equal(q(x), nn.functional.linear(x, q.weight_value(), linear.bias))


def test_quantize_keeps_what_trains_in_float_and_a_quarter_of_the_rest():
    model = tiny_model("llama")
    x = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        reference = model(input_ids=x).logits
    keep = {id(p) for _, p in select_trainable(model, "last-blocks:1")}
    saved = quantize_(model, "int8", keep, log=lambda *a: None)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    kept = [m for m in linears if type(m) is nn.Linear]
    assert all(id(m.weight) in keep or m is model.get_output_embeddings() for m in kept)
    assert sum(isinstance(m, Int8Linear) for m in linears) == 2 * 7  # q k v o gate up down of two blocks
    assert saved > 0
    with torch.no_grad():
        quantized = model(input_ids=x).logits
    assert (quantized - reference).abs().max() < 0.05 * reference.abs().max()
    scales = select_trainable(model, "scales")
    assert len(scales) == 14 and all(p.dim() == 1 for _, p in scales)
    assert not {id(p) for _, p in scales} & {id(p) for _, p in select_trainable(model, "norms")}


def test_zo_on_the_scales_alone_lowers_the_loss():
    model = tiny_model("llama")
    quantize_(model, "int8", set(), log=lambda *a: None)
    params = [p for _, p in select_trainable(model, "scales")]
    x = torch.randint(0, 1000, (8, 12), generator=torch.Generator().manual_seed(0))

    def loss():
        with torch.inference_mode():
            logits = model(input_ids=x).logits[:, :-1]
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    opt = ZOSGD(params, lr=1e-3, eps=1e-4, seed=0)
    start = float(loss())
    for _ in range(40):
        opt.step(loss)
    assert float(loss()) < start - 0.01


def args(model, data, out, *extra, steps=6):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=3", "run.snapshot_every=2",
            "run.device=cpu", "--lr", "1e-3", "task.verbalizer={pos: great, neg: terrible}", "model.quantize=int8",
            "--trainable", "scales", *extra]


def test_a_qzo_run_resumes_exactly_and_exports_a_standard_model(tiny_model_dir, data_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    whole = tmp_path / "whole"
    assert main(args(tiny_model_dir, data_file, whole)) == 0
    out = capsys.readouterr().out
    assert "quantized 21 block linears to int8" in out and "trainable (scales): 21 tensors" in out
    parts = tmp_path / "parts"
    assert main(args(tiny_model_dir, data_file, parts, steps=3)) == 0
    assert main(["resume", str(parts), "run.steps=6"]) == 0
    assert (parts / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()
    exported = tmp_path / "model"
    assert main(["export", str(whole), "--out", str(exported)]) == 0
    model = AutoModelForCausalLM.from_pretrained(exported)  # plain nn.Linear layers holding q x trained scale
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert main(["eval", "--model", str(exported), "--data", str(data_file), "--split", "test", "--out",
                 str(tmp_path / "e.json"), "task.verbalizer={pos: great, neg: terrible}", "task.n_test=8",
                 "task.n_dev=4"]) == 0
    after = json.loads((whole / "summary.json").read_text())["after"]
    evaluated = json.loads((tmp_path / "e.json").read_text())["splits"]["test"]
    assert evaluated["accuracy"] == after["accuracy"] and evaluated["loss"] == pytest.approx(after["loss"], abs=1e-5)


@pytest.mark.parametrize("extra,match", [
    (["adapter.kind=lora"], "model.quantize=int8 works on a resident model without an adapter"),
    (["--offload", "cpu"], "model.quantize=int8 works on a resident model without an adapter"),
    (["model.quantize=none"], "model.trainable=scales tunes the scales of a quantized base"),
    (["model.quantize=int4"], "model.quantize='int4': use one of none, int8"),
])
def test_quantized_combinations_that_cannot_work_are_refused(tiny_model_dir, data_file, tmp_path, capsys, extra, match):
    assert main(args(tiny_model_dir, data_file, tmp_path / "r", *extra)) == 2
    assert match in capsys.readouterr().err


def test_dequantize_gives_back_linears_with_the_same_function():
    model = tiny_model("qwen2")
    quantize_(model, "int8", set(), log=lambda *a: None)
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        before = model(input_ids=x).logits
        dequantize_(model)
        after = model(input_ids=x).logits
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-6)
