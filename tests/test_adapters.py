"""LoRA through HF PEFT: only the adapter trains; resume, streaming and export keep their guarantees."""

import torch
from safetensors.torch import load_file

from zotune.cli import main


def args(model, data, out, *extra, steps=6):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=3", "run.snapshot_every=2",
            "run.device=cpu", "--lr", "1e-2", "task.verbalizer={pos: great, neg: terrible}", "adapter.kind=lora",
            "adapter.r=4", *extra]


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
    assert main(args(tiny_model_dir, data_file, tmp_path / "a", "adapter.kind=prefix")) == 2
    assert "adapter.kind='prefix' is not known" in capsys.readouterr().err
    assert main(args(tiny_model_dir, data_file, tmp_path / "b", "adapter.targets=no_such_module")) == 2
    assert "adapter.targets='no_such_module'" in capsys.readouterr().err
