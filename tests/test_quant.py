"""Quantized bases: int8 block linears with a float scale per row, int4 ones with a scale and a minimum
per group of 32 inputs; ZO on the scales (QZO) or on a float subset; runs that resume exactly and
export a standard model."""

import json

import pytest
import torch
from torch import nn

from conftest import tiny_model
from zotune import ZOSGD
from zotune.cli import main
from zotune.models import find_blocks, select_trainable
from zotune.quant import GROUP, Int4Linear, Int8Linear, QuantizedLinear, dequantize_, quantize_


def test_an_int8_linear_is_its_dequantized_weight_within_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    q = Int8Linear(linear)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (24,)
    assert ((linear.weight - q.weight_value()).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 48)
    assert torch.equal(q(x), nn.functional.linear(x, q.weight_value(), linear.bias))


def test_an_int4_linear_is_its_dequantized_weight_within_half_a_step_of_its_group():
    torch.manual_seed(0)
    linear = nn.Linear(96, 10)
    q = Int4Linear(linear)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (10, 48)
    assert q.scale.shape == (10 * 96 // GROUP,) and q.minimum.shape == (10, 96 // GROUP)  # 1-D: never decayed
    step = q.scale.view(10, -1).repeat_interleave(GROUP, 1)
    assert ((linear.weight - q.weight_value()).abs() <= step / 2 + 1e-6).all()
    assert q.stored_bytes() == 10 * 48 + 2 * 10 * 3 * 4  # 0.5 byte a weight, two floats a group
    x = torch.randn(5, 96)
    assert torch.equal(q(x), nn.functional.linear(x, q.weight_value(), linear.bias))


@pytest.mark.parametrize("seed", range(5))
def test_int4_gives_back_a_q4_1_weight_exactly(seed):
    """A weight on the 4-bit grid of GGUF's Q4_1 (w = d·q + m per 32 inputs with d and m in fp16, q
    spanning 0..15 in each group, as a loaded .gguf's Q4_1 tensors are) comes back bit for bit: on
    SmolLM2, `model.quantize=int4` is lossless."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (8, 64), generator=gen)
    q[:, ::GROUP], q[:, 1::GROUP] = 0, 15  # every group uses the whole range, as a Q4_1 block usually does
    d = (torch.rand(8, 2, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(8, 2, 1, generator=gen) * 0.05).half().float()
    weight = (q.view(8, 2, GROUP).float() * d + m).view(8, 64)
    linear = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    assert torch.equal(Int4Linear(linear).weight_value(), weight)


@pytest.mark.parametrize("kind,ratio", [("int8", 0.29), ("int4", 0.19)])
def test_every_quantized_kind_runs_a_model_close_to_its_float_self_and_trains_its_scales(kind, ratio):
    model = tiny_model("llama")
    x = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=x).logits
    floats = sum(m.weight.nbytes for _, b in find_blocks(model) for m in b.modules() if type(m) is nn.Linear)
    saved = quantize_(model, kind, set(), log=lambda *a: None)
    assert (floats - saved) <= ratio * floats  # what the weights cost at rest
    with torch.no_grad():
        quantized = model(input_ids=x).logits
    assert (quantized - reference).abs().max() < 0.1 * reference.abs().max()
    params = [p for _, p in select_trainable(model, "scales")]
    assert len(params) == 21 and all(p.dim() == 1 and not p.requires_grad for p in params)  # 7 linears x 3 blocks

    def loss():
        logits = model(input_ids=x).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    opt = ZOSGD(params, lr=1e-3, eps=1e-4, seed=0)
    with torch.inference_mode():
        start = float(loss())
    for _ in range(40):
        opt.step(loss)
    with torch.inference_mode():
        assert float(loss()) < start - 0.01
    dequantize_(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_int4_keeps_layers_whose_inputs_do_not_split_into_groups_in_float():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    said = []
    quantize_(model, "int4", set(), log=said.append)  # q k v o gate up: 64 inputs; down: 80, uneven
    assert "(1 kept in float: their inputs are not a multiple of 32)" in said[0]
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    with pytest.raises(Exception, match="none has a multiple of 32 inputs"):
        quantize_(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=40,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)),
                  "int4", set(), log=said.append)


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


def test_quantizing_leaves_no_float_tensor_a_view_of_the_loaded_checkpoint():
    """A checkpoint is loaded as views of one memory map: a view left alive keeps every page read resident."""
    model = tiny_model("llama")
    params = list(model.parameters())
    arena = torch.cat([p.detach().reshape(-1) for p in params])  # one buffer, as safetensors' mmap is
    offset = 0
    for p in params:
        p.data = arena[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    quantize_(model, "int4", set(), log=lambda *a: None)
    arena_at = arena.untyped_storage().data_ptr()
    assert not [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() == arena_at]


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


def args(model, data, out, *extra, steps=6, kind="int8"):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=3", "run.snapshot_every=2",
            "run.device=cpu", "--lr", "1e-3", "task.verbalizer={pos: great, neg: terrible}", f"model.quantize={kind}",
            "--trainable", "scales", *extra]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_qzo_run_resumes_exactly_and_exports_a_standard_model(kind, tiny_model_dir, data_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    whole = tmp_path / "whole"
    assert main(args(tiny_model_dir, data_file, whole, kind=kind)) == 0
    out = capsys.readouterr().out
    assert f"quantized 21 block linears to {kind}" in out and "trainable (scales): 21 tensors" in out
    parts = tmp_path / "parts"
    assert main(args(tiny_model_dir, data_file, parts, steps=3, kind=kind)) == 0
    assert main(["resume", str(parts), "run.steps=6"]) == 0
    assert (parts / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()
    exported = tmp_path / "model"
    assert main(["export", str(whole), "--out", str(exported)]) == 0
    model = AutoModelForCausalLM.from_pretrained(exported)  # plain nn.Linear layers holding q x trained scale
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert main(["eval", "--model", str(exported), "--data", str(data_file), "--split", "test", "--out",
                 str(tmp_path / "e.json"), "task.verbalizer={pos: great, neg: terrible}", "task.n_test=8",
                 "task.n_dev=4"]) == 0
    after = json.loads((whole / "summary.json").read_text())["after"]
    evaluated = json.loads((tmp_path / "e.json").read_text())["splits"]["test"]
    assert evaluated["accuracy"] == after["accuracy"] and evaluated["loss"] == pytest.approx(after["loss"], abs=1e-5)


@pytest.mark.parametrize("extra,match", [
    (["adapter.kind=lora"], "model.quantize=int8 with adapter.kind=lora is not supported yet"),
    (["model.quantize=none"], "model.trainable=scales tunes the scales of a quantized base"),
    (["model.quantize=int2"], "model.quantize='int2': use one of none, int8, int4"),
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


@pytest.mark.parametrize("kind,trainable", [("int8", "scales"), ("int4", "scales"), ("int4", "last-blocks:1")])
def test_a_quantized_base_streams_on_both_tiers_like_resident(kind, trainable, tiny_model_dir, data_file, tmp_path):
    """The quantized values travel with their block like any weight (integers stay integers, on the
    tier and on the device): streamed == resident bit for bit on both tiers, a disk-tier run resumes
    exactly, and its export (written block by block, dequantized) equals the resident run's."""
    from conftest import exported

    common = ["--trainable", trainable, "run.keep=last"]  # (a disk-tier run keeps its last step)
    resident = tmp_path / "resident"
    assert main(args(tiny_model_dir, data_file, resident, *common, kind=kind)) == 0
    log = (resident / "steps.log").read_bytes()
    ram = tmp_path / "ram"
    assert main(args(tiny_model_dir, data_file, ram, *common, "--offload", "cpu", kind=kind)) == 0
    assert (ram / "steps.log").read_bytes() == log
    disk = tmp_path / "disk"
    assert main(args(tiny_model_dir, data_file, disk, *common, "--offload", "disk", "--offload-dir",
                     str(tmp_path / "blocks"), kind=kind)) == 0
    assert (disk / "steps.log").read_bytes() == log
    manifest = json.loads((tmp_path / "blocks" / "manifest.json").read_text())
    dtypes = {t["dtype"] for b in manifest["blocks"] for t in b["tensors"] if t["name"].endswith(".qweight")}
    assert dtypes == {"int8" if kind == "int8" else "uint8"}
    parts = tmp_path / "parts"
    assert main(args(tiny_model_dir, data_file, parts, *common, "--offload", "disk", "--offload-dir",
                     str(tmp_path / "blocks2"), steps=3, kind=kind)) == 0
    assert main(["resume", str(parts), "run.steps=6"]) == 0
    assert (parts / "steps.log").read_bytes() == log
    a, b = exported(resident, tmp_path / "model-resident"), exported(disk, tmp_path / "model-disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
