"""LoRA and prefix tuning through HF PEFT: only the adapter trains; resume, streaming and export keep
their guarantees; a prefix starts from the model's own keys and values of real tokens."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main

LORA = ("adapter.kind=lora", "adapter.r=4")


def args(model, data, out, *extra, steps=6, adapter=LORA):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=3", "run.snapshot_every=2",
            "run.keep=last", "run.device=cpu", "--lr", "1e-2", "task.verbalizer={pos: great, neg: terrible}", *adapter,
            *extra]


def final(run):
    return load_file(sorted((run / "snapshots").glob("step-*.safetensors"))[-1])


def test_lora_trains_only_the_adapter_resumes_streams_and_exports(tiny_model_dir, data_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    whole = tmp_path / "whole"
    assert main(args(tiny_model_dir, data_file, whole)) == 0
    out = capsys.readouterr().out
    assert "trainable (LoRA r=4 on PEFT default modules): 12 tensors" in out  # q and v of 3 Llama blocks, A and B
    weights = final(whole)
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in weights.values())

    parts = tmp_path / "parts"  # stopped after 3 steps, resumed: the same log, bit for bit
    assert main(args(tiny_model_dir, data_file, parts, steps=3)) == 0
    assert main(["resume", str(parts), "run.steps=6"]) == 0
    assert (parts / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()

    streamed = tmp_path / "streamed"  # the adapter's tensors stream with their blocks
    assert main(args(tiny_model_dir, data_file, streamed, "--offload", "cpu")) == 0
    assert (streamed / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()

    exported = tmp_path / "adapter"
    assert main(["export", str(whole), "--out", str(exported)]) == 0
    assert (exported / "adapter_config.json").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), exported)
    trained = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(trained) == len(weights)
    assert all(torch.equal(p, weights[f"t{i}"]) for i, p in enumerate(trained))


def test_bad_adapter_settings_are_refused(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(args(tiny_model_dir, data_file, tmp_path / "a", "adapter.kind=ia3")) == 2
    assert "adapter.kind='ia3' is not known" in capsys.readouterr().err
    assert main(args(tiny_model_dir, data_file, tmp_path / "c", adapter=("adapter.kind=prefix",
                                                                          "adapter.init=zeros"))) == 2
    assert "adapter.init='zeros'" in capsys.readouterr().err
    assert main(args(tiny_model_dir, data_file, tmp_path / "b", "adapter.targets=no_such_module")) == 2
    assert "adapter.targets='no_such_module'" in capsys.readouterr().err
    assert main(args(tiny_model_dir, data_file, tmp_path / "d", adapter=("adapter.kind=prefix", "adapter.r=4"))) == 2
    assert "adapter.r=4 is an option of adapter.kind=lora, but adapter.kind=prefix" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "qwen2"])
def test_a_prefix_starts_as_the_models_own_keys_and_values_of_real_tokens(family):
    """PEFT's prefix, as its forward hands it to every layer, equals the cache of n real tokens."""
    from conftest import tiny_model
    from zotune.adapters import AdapterConfig, apply_adapter

    model, named = apply_adapter(tiny_model(family), AdapterConfig(kind="prefix", tokens=4), seed=7)
    assert [n for n, _ in named] == ["prompt_encoder.default.embedding.weight"]
    gen = torch.Generator().manual_seed(7)  # the tokens the initialisation drew
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, 4), generator=gen)
    with torch.no_grad():
        real = model.get_base_model()(input_ids=ids, use_cache=True).past_key_values
        prompt = model.get_prompt(batch_size=1)
    for layer, (k, v) in zip(real.layers, [(lay.keys, lay.values) for lay in prompt.layers]):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    with torch.no_grad():  # and with it the model continues those tokens as if it had read them
        x = torch.tensor([[5, 6, 7]])
        full = model.get_base_model()(input_ids=torch.cat([ids, x], 1)).logits[:, 4:]
        prefixed = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert torch.allclose(full, prefixed, atol=1e-5)


def test_prefix_tuning_trains_only_the_prefix_resumes_and_exports(tiny_model_dir, data_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prefix = ["adapter.kind=prefix", "adapter.tokens=3"]
    whole = tmp_path / "whole"
    assert main(args(tiny_model_dir, data_file, whole, adapter=prefix)) == 0
    said = capsys.readouterr().out
    assert "trainable (prefix tuning, 3 tokens per layer, real initialisation): 1 tensors, 288 values" in said
    parts = tmp_path / "parts"
    assert main(args(tiny_model_dir, data_file, parts, adapter=prefix, steps=3)) == 0
    assert main(["resume", str(parts), "run.steps=6"]) == 0
    assert (parts / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["after"]["loss"] != summary["before"]["loss"]
    exported = tmp_path / "adapter"
    assert main(["export", str(whole), "--out", str(exported)]) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), exported)
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, final(whole)["t0"])


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_adapters_on_the_disk_tier_equal_resident_resume_and_export(kind, tiny_model_dir, data_file, tmp_path):
    """On the disk tier the frozen base streams from its folder and the adapter's tensors stay on the
    device (outside the blocks): the same log as resident, bit for bit, after a resume too, and the
    same exported adapter. A prepared stream folder serves any number of adapter runs unchanged."""
    kind_args = ["--lr", "1e-2", "--eps", "1e-1"] if kind == "prefix" else []
    adapter = ("adapter.kind=prefix",) if kind == "prefix" else LORA
    resident = tmp_path / "resident"
    assert main(args(tiny_model_dir, data_file, resident, *kind_args, adapter=adapter)) == 0
    disk = tmp_path / "disk"
    assert main(args(tiny_model_dir, data_file, disk, *kind_args, "--offload", "disk", "--offload-dir",
                     str(tmp_path / "blocks"), adapter=adapter)) == 0
    assert (disk / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()
    parts = tmp_path / "parts"
    assert main(args(tiny_model_dir, data_file, parts, *kind_args, "--offload", "disk", "--offload-dir",
                     str(tmp_path / "blocks2"), steps=3, adapter=adapter)) == 0
    assert main(["resume", str(parts), "run.steps=6"]) == 0
    assert (parts / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()
    for run in (resident, disk):
        assert main(["export", str(run), "--out", str(tmp_path / f"export-{run.name}")]) == 0
    a = load_file(tmp_path / "export-resident" / "adapter_model.safetensors")
    b = load_file(tmp_path / "export-disk" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the folder of the first disk run, as a model: its blocks never changed, so a new adapter run starts there
    again = tmp_path / "again"
    assert main(args(tmp_path / "blocks", data_file, again, *kind_args, adapter=adapter)) == 0
    assert (again / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()


TT = ("adapter.kind=tt", "adapter.r=4")


def test_a_tensor_train_delta_is_the_chain_product_of_its_cores():
    from zotune.tt_adapter import TTDelta, factors

    assert factors(576, 3) == [8, 8, 9] and factors(32, 3) == [2, 4, 4] and factors(13, 3) == [1, 1, 13]
    linear = torch.nn.Linear(32, 48)
    tt = TTDelta(linear, rank=3, n_cores=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tt.delta_weight(), torch.zeros(48, 32))  # the last core is zero: the model starts as the base
    with torch.no_grad():
        for core in tt.cores:
            core.copy_(torch.randn(core.shape))
    g1, g2, g3 = (c.reshape(c.shape[0], o, i, c.shape[-1]) for c, o, i in zip(tt.cores, tt.outs, tt.ins))
    reference = torch.einsum("xabr,rcds,sefy->acebdf", g1, g2, g3).reshape(48, 32)  # W[(o1 o2 o3), (i1 i2 i3)]
    assert torch.allclose(tt.delta_weight(), reference, atol=1e-5)
    x = torch.randn(2, 5, 32)
    assert torch.allclose(tt(x), linear(x) + x @ reference.T, atol=1e-5)
    assert torch.allclose(tt.merged()(x), tt(x), atol=1e-5)
    square = TTDelta(torch.nn.Linear(576, 576), rank=8, n_cores=3, generator=torch.Generator())
    assert sum(c.numel() for c in square.cores) == 5256 < 2 * 576 * 8  # fewer values than LoRA at the same rank


def test_tt_adapters_train_resume_stream_and_export_a_merged_model(tiny_model_dir, data_file, tmp_path, capsys):
    from conftest import exported, tiny_model

    whole = tmp_path / "whole"
    assert main(args(tiny_model_dir, data_file, whole, adapter=TT)) == 0
    assert "trainable (tensor-train adapters, 3 cores of rank 4 on PEFT default modules): 18 tensors" in \
        capsys.readouterr().out  # q and v of 3 Llama blocks, 3 cores each
    parts = tmp_path / "parts"
    assert main(args(tiny_model_dir, data_file, parts, steps=3, adapter=TT)) == 0
    assert main(["resume", str(parts), "run.steps=6"]) == 0
    assert (parts / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()
    streamed = tmp_path / "streamed"  # the cores stream with their blocks
    assert main(args(tiny_model_dir, data_file, streamed, "--offload", "cpu", adapter=TT)) == 0
    assert (streamed / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()
    disk = tmp_path / "disk"  # the folder holds the base; the cores stay on the device, resumed mid-run
    assert main(args(tiny_model_dir, data_file, disk, "--offload", "disk", "--offload-dir", str(tmp_path / "blocks"),
                     steps=3, adapter=TT)) == 0
    assert main(["resume", str(disk), "run.steps=6"]) == 0
    assert (disk / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()
    merged, base = exported(whole, tmp_path / "model"), tiny_model("llama").state_dict()
    from_disk = exported(disk, tmp_path / "model-disk")  # written block by block, each delta merged
    assert merged.keys() == from_disk.keys() and all(torch.equal(merged[k], from_disk[k]) for k in merged)
    moved = {k for k in merged if k in base and not torch.equal(merged[k], base[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    assert not any("cores" in k for k in merged)  # a standard model: the deltas folded into the linears
    assert main(["replay", str(whole), "--out", str(tmp_path / "again")]) == 0
    again = load_file(next((tmp_path / "again").glob("*.safetensors")))
    assert all(torch.equal(again[k], merged[k]) for k in again)
    for extra, match in ((("adapter.cores=1",), "adapter.cores=1 must be"),
                         (("adapter.alpha=4",), "adapter.alpha=4.0 is an option of adapter.kind=lora"),
                         (("adapter.targets=nothing",), "no nn.Linear of this model has that name")):
        assert main(args(tiny_model_dir, data_file, tmp_path / "bad", *extra, adapter=TT)) == 2
        assert match in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("adapter", [LORA, TT], ids=["lora", "tt"])
def test_adapters_on_the_last_blocks_leave_a_frozen_prefix_equal_to_the_whole_forward(adapter, tiny_model_dir,
                                                                                      data_file, tmp_path, capsys):
    """`adapter.last_blocks=1`: only the last block's linears are adapted, so blocks 0..1 run once per
    batch and every probe reuses their output; streamed from host memory or from the disk tier (whole
    forwards, no prefix) is the same run."""
    last = (*adapter, "adapter.last_blocks=1")
    resident = tmp_path / "resident"
    assert main(args(tiny_model_dir, data_file, resident, adapter=last)) == 0
    out = capsys.readouterr().out
    assert "of the last 1 blocks): " in out and "blocks 0..1 are frozen" in out
    names = [line for line in out.splitlines() if "trainable (" in line]
    streamed = tmp_path / "streamed"
    assert main(args(tiny_model_dir, data_file, streamed, "--offload", "cpu", adapter=last)) == 0
    assert "are frozen" not in capsys.readouterr().out
    assert (streamed / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()
    disk = tmp_path / "disk"  # the base from its folder, the adapter on the device
    assert main(args(tiny_model_dir, data_file, disk, "--offload", "disk", "--offload-dir", str(tmp_path / "blocks"),
                     adapter=last)) == 0
    assert (disk / "steps.log").read_bytes() == (resident / "steps.log").read_bytes()
    everywhere = tmp_path / "everywhere"
    assert main(args(tiny_model_dir, data_file, everywhere, adapter=adapter)) == 0
    assert len(final(resident)) * 3 == len(final(everywhere))  # q and v of one block of three
    assert names and "are frozen" not in capsys.readouterr().out
    exported = tmp_path / "export"
    assert main(["export", str(resident), "--out", str(exported)]) == 0
    capsys.readouterr()
    if adapter == LORA:
        targets = json.loads((exported / "adapter_config.json").read_text())["target_modules"]
        assert sorted(targets) == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    for extra, match in ((("adapter.last_blocks=4",), "adapter.last_blocks=4, but this model has 3 blocks"),
                         (("adapter.last_blocks=-1",), "adapter.last_blocks=-1 must be an integer >= 0"),
                         (("adapter.last_blocks=1", "adapter.targets=nothing"), "no nn.Linear of the last 1 blocks")):
        assert main(args(tiny_model_dir, data_file, tmp_path / "bad", *extra, adapter=adapter)) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert main(args(tiny_model_dir, data_file, tmp_path / "bad", adapter=("adapter.kind=prefix",
                                                                            "adapter.last_blocks=1"))) == 2
    assert "adapter.last_blocks=1 is an option of adapter.kind=lora" in capsys.readouterr().err
