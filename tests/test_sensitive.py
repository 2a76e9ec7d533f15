"""Sensitive sparse ZO: the mask (`zotune sensitivity`, block-by-block backprop == whole-model autograd),
the sparse delta on a float or int4 base (resident == streamed, resumed == uninterrupted, exported ==
base + delta), and bad masks refused with one line."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import exported, tiny_model
from test_trial import FAST
from zotune.cli import main
from zotune.models import find_blocks
from zotune.sensitivity import squared_gradients
from zotune.sparse_delta import SparseDelta, attach_deltas, load_mask, merge_deltas_, save_mask, wrap_entries
from zotune.steplog import decode_steps
from zotune.tasks import ClassificationTask, Table, TaskConfig

VERBALIZER = ("task.verbalizer={pos: great, neg: terrible}", "task.n_dev=8", "task.n_test=8")
ROWS = Table([{"text": f"film {i} was {'wonderful' if i % 2 else 'awful'}", "label": "pos" if i % 2 else "neg"}
              for i in range(24)], "inline")


@pytest.fixture(scope="module")
def mask(tiny_model_dir, data_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "mask.safetensors"
    assert main(["sensitivity", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(path),
                 "--density", "0.02", "--rows", "16", "--batch-size", "4",
                 "task.verbalizer={pos: great, neg: terrible}", "task.n_dev=8", "task.n_test=8"]) == 0
    return path


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_block_by_block_squared_gradients_pick_the_whole_models_top_entries(family, tokenizer):
    model = tiny_model(family)
    task = ClassificationTask(TaskConfig(data="inline", verbalizer={"pos": "great", "neg": "terrible"}, n_dev=0,
                                         n_test=4), tokenizer, ROWS)
    batches = [task.collate(task.train[i:i + 4]) for i in range(0, 16, 4)]
    picked, total = squared_gradients(model, task, batches, 0.02, log=lambda *a: None)
    # the reference: autograd through the whole model, batch by batch, squared and summed
    weights = {f"{b}.{n}.weight": m.weight for b, block in find_blocks(model) for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear)}
    scores = {name: torch.zeros_like(w) for name, w in weights.items()}
    for batch in batches:
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            grads = torch.autograd.grad(task.loss(model, batch), list(weights.values()))
        for (name, w), g in zip(weights.items(), grads):
            scores[name] += g.square()
            w.requires_grad_(False)
    flat = torch.cat([s.view(-1) for s in scores.values()])
    assert total == flat.numel() and sum(len(v) for v in picked.values()) == round(0.02 * total)
    threshold = flat.topk(round(0.02 * total)).values[-1]
    for name, index in picked.items():  # every entry picked is among the largest (up to float summation order)
        assert bool((scores[name].view(-1)[index] >= threshold * (1 - 1e-4)).all()), name
    assert len(picked) > 1  # spread over several matrices, not one


def test_the_mask_records_how_it_was_made_and_a_run_trains_only_its_entries(mask, tiny_model_dir, data_file,
                                                                              tmp_path, capsys):
    indices, how = load_mask(mask)
    assert how["rows"] == 16 and how["density"] == 0.02 and how["entries"] == sum(len(v) for v in indices.values())
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--steps", "6",
                 *FAST, f"model.trainable=sensitive:{mask}", "--method", "zosgd", "--lr", "1e-2", "run.keep=last"]) == 0
    assert f"{how['entries']:,} entries of the mask" in capsys.readouterr().out
    model = exported(out, tmp_path / "model")
    base = {k: v for k, v in tiny_model("llama").state_dict().items()}
    changed = 0
    for name, weight in model.items():
        if name in indices:
            moved = (weight.view(-1) != base[name].view(-1)).nonzero().view(-1)
            assert set(moved.tolist()) <= set(indices[name].tolist())  # only the masked entries moved
            changed += len(moved)
        elif name in base:
            assert torch.equal(weight, base[name]), name  # everything else is the base
    assert changed > 0 and not any("delta" in k or "index" in k for k in model)  # a standard model


def test_a_mask_of_the_last_blocks_keeps_a_frozen_prefix_to_reuse(tiny_model_dir, data_file, tmp_path, tokenizer,
                                                                   capsys):
    model = tiny_model("llama")
    task = ClassificationTask(TaskConfig(data="inline", verbalizer={"pos": "great", "neg": "terrible"}, n_dev=0,
                                         n_test=4), tokenizer, ROWS)
    batches = [task.collate(task.train[i:i + 4]) for i in range(0, 16, 4)]
    whole, _ = squared_gradients(model, task, batches, 0.02, log=lambda *a: None)
    last, total = squared_gradients(model, task, batches, 0.02, log=lambda *a: None, last_blocks=1)
    block = find_blocks(model)[-1]
    assert total == sum(m.weight.numel() for m in block[1].modules() if isinstance(m, torch.nn.Linear))
    assert last and all(name.startswith(block[0] + ".") for name in last)
    assert sum(len(v) for v in last.values()) == round(0.02 * total)
    # the same scores, so both are a top of that block's entries: the fewer picks are among the more
    mine = [{(n, i) for n, index in picks.items() if n in last for i in index.tolist()} for picks in (whole, last)]
    fewer, more = sorted(mine, key=len)
    assert fewer and fewer <= more
    mask = tmp_path / "last.safetensors"
    assert main(["sensitivity", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(mask),
                 "--density", "0.02", "--rows", "16", "--batch-size", "4", "--last-blocks", "1", *VERBALIZER]) == 0
    assert load_mask(mask)[1]["blocks"] == "the last 1"
    runs = []
    for name, extra in (("resident", ()), ("streamed", ("--offload", "cpu"))):  # (streamed: no prefix reused)
        runs.append(tmp_path / name)
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(runs[-1]),
                     "--steps", "4", *FAST, "run.eval_every=0", "run.keep=last", "--method", "zosgd",
                     f"model.trainable=final-norm+sensitive:{mask}", *extra]) == 0
        if name == "resident":
            assert "blocks 0..1 are frozen" in capsys.readouterr().out
    assert (runs[0] / "steps.log").read_bytes() == (runs[1] / "steps.log").read_bytes()
    assert main(["sensitivity", "--model", str(tiny_model_dir), "--data", str(data_file), "--out",
                 str(tmp_path / "bad.safetensors"), "--last-blocks", "9", *VERBALIZER]) == 2
    assert "the model has 3 blocks" in capsys.readouterr().err


def test_a_mask_measured_on_a_stream_folder_is_the_resident_models(mask, tiny_model_dir, data_file, tmp_path,
                                                                     capsys):
    """A stream folder streams block by block (each held on the device for its forward and backward):
    the same scores, so the same mask as the resident model's; a quantized folder is refused."""
    folder = tmp_path / "stream"
    assert main(["stream", "prepare", "--model", str(tiny_model_dir), "--out", str(folder)]) == 0
    streamed = tmp_path / "streamed.safetensors"
    assert main(["sensitivity", "--model", str(folder), "--data", str(data_file), "--out", str(streamed),
                 "--density", "0.02", "--rows", "16", "--batch-size", "4", *VERBALIZER]) == 0
    (a, _), (b, how_b) = load_mask(mask), load_mask(streamed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and how_b["model"] == str(folder)
    int4 = tmp_path / "int4"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "q"),
                 "--steps", "1", *FAST, "run.eval_every=0", "run.keep=last", "model.quantize=int4",
                 "--trainable", "final-norm", "--offload", "disk", "--offload-dir", str(int4)]) == 0
    capsys.readouterr()
    assert main(["sensitivity", "--model", str(int4), "--data", str(data_file), "--out", str(tmp_path / "x"),
                 *VERBALIZER]) == 2
    assert "holds quantized blocks" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_sparse_delta_on_an_int4_base_streams_resumes_and_exports_as_it_trained(mask, tiny_model_dir, data_file,
                                                                              tmp_path):
    def args(out, steps, *extra):
        return ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--steps",
                str(steps), *FAST, "run.eval_every=0", "run.keep=last", f"model.trainable=sensitive:{mask}",
                "model.quantize=int4", "--method", "zosgd", "--lr", "1e-2", "run.snapshot_every=2", *extra]

    assert main(args(tmp_path / "whole", 6)) == 0
    whole = exported(tmp_path / "whole", tmp_path / "m1")
    log = (tmp_path / "whole" / "steps.log").read_bytes()
    # host-memory streaming (the deltas travel with their blocks), then the disk tier (the folder holds the
    # int4 base alone; the deltas stay on the device, as an adapter's tensors do): both resumed mid-run
    for tier in ("cpu", "disk"):
        run = tmp_path / tier
        where = ("--offload-dir", str(tmp_path / "blocks")) if tier == "disk" else ()
        assert main(args(run, 3, "--offload", tier, *where)) == 0
        assert main(["resume", str(run), "run.steps=6"]) == 0
        assert (run / "steps.log").read_bytes() == log
        streamed = exported(run, tmp_path / f"m-{tier}")
        assert whole.keys() == streamed.keys() and all(torch.equal(whole[k], streamed[k]) for k in whole)
    # the folder, as a model: its blocks never changed, so a new run on it starts from the same base
    again = args(tmp_path / "again", 6)
    assert main(again[:2] + [str(tmp_path / "blocks")] + [a for a in again[3:] if a != "model.quantize=int4"]) == 0
    assert (tmp_path / "again" / "steps.log").read_bytes() == log
    assert main(["replay", str(tmp_path / "whole"), "--out", str(tmp_path / "m3")]) == 0
    with safe_open(str(next((tmp_path / "m3").glob("*.safetensors"))), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), whole[k]) for k in f.keys())


def test_memory_at_rest_is_the_base_plus_the_masked_values_and_indices(mask):
    model = tiny_model("llama")
    entries = attach_deltas(model, mask)
    deltas = [m for m in model.modules() if isinstance(m, SparseDelta)]
    assert sum(len(m.delta) for m in deltas) == entries
    assert sum(m.delta.untyped_storage().nbytes() + m.index.untyped_storage().nbytes() for m in deltas) == 12 * entries
    other = tiny_model("llama")  # an index that is a view of a larger tensor is copied, not kept with its storage
    name = next(iter(load_mask(mask)[0]))
    wrap_entries(other, {name: torch.arange(1000)[:3]})
    assert other.get_submodule(name.rpartition(".")[0]).index.untyped_storage().nbytes() == 3 * 8
    x = torch.randn(2, 5, 32)
    for m in deltas:  # the forward is the base plus the delta on exactly those entries
        with torch.no_grad():
            m.delta.copy_(torch.randn(len(m.delta)))
            dense = m.base.weight.clone()
            dense.view(-1)[m.index] += m.delta
            assert torch.allclose(m(x[..., :m.in_features]), x[..., :m.in_features] @ dense.T, atol=1e-5)
    merge_deltas_(model)
    assert not any(isinstance(m, SparseDelta) for m in model.modules())


@pytest.mark.parametrize("bad, match", [
    ("not-a-mask", "is not a sensitivity mask"),
    ("missing", "cannot read the sensitivity mask"),
    ("other-model", "is not the weight of a linear layer of this model"),
    ("out-of-range", "names entries outside"),
])
def test_a_bad_mask_is_refused_in_one_line_before_the_run(bad, match, tiny_model_dir, data_file, tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / f"{bad}.safetensors"
    if bad == "not-a-mask":
        save_file({"x": torch.zeros(2)}, str(path))
    elif bad == "other-model":
        save_mask(path, {"transformer.h.0.attn.c_attn.weight": torch.tensor([1, 2])}, {})
    elif bad == "out-of-range":
        save_mask(path, {"model.layers.0.mlp.up_proj.weight": torch.tensor([1, 10**6])}, {})
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--steps", "2",
                 *FAST, f"model.trainable=sensitive:{path}"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_bad_mask_on_the_disk_tier_and_an_existing_out_file_are_refused(tiny_model_dir, data_file, tmp_path,
                                                                             capsys, mask):
    wrong = tmp_path / "wrong.safetensors"
    save_mask(wrong, {"model.layers.0.mlp.up_proj.weight": torch.tensor([1, 10**6])}, {})
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "r"),
                 *FAST, f"model.trainable=sensitive:{wrong}", "--offload", "disk", "--offload-dir",
                 str(tmp_path / "blocks")]) == 2
    assert "names entries outside" in capsys.readouterr().err and not (tmp_path / "blocks").exists()
    mine = tmp_path / "mine.safetensors"
    mine.write_text("a user's file")
    assert main(["sensitivity", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(mine),
                 "task.n_dev=8", "task.n_test=8"]) == 2
    assert mine.read_text() == "a user's file" and "exists" in capsys.readouterr().err
    assert json.loads(json.dumps(load_mask(mask)[1]))["criterion"].startswith("squared gradient")


def test_the_backprop_reference_trains_the_same_masked_entries(mask, tiny_model_dir, data_file, capsys):
    entries = sum(len(v) for v in load_mask(mask)[0].values())
    assert main(["bench", "first-order", "--lr", "3e-2", "--json", f"model.name={tiny_model_dir}",
                 f"task.data={data_file}", f"model.trainable=sensitive:{mask}", "run.steps=40", *FAST]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["trained_values"] == entries
    assert result["final_train_loss"] < result["first_train_loss"] - 0.05  # backprop through the deltas learns


def test_the_memory_bench_trains_the_masked_entries_resident_and_from_disk():
    from zotune.bench.sensitive import run_sensitive_bench

    got = run_sensitive_bench("tiny", 2, 2, 8, 0.01, log=lambda *a: None,
                              cases=("full ZO, float32", "sensitive, int4 base on disk"))["cases"]
    full, disk = got["full ZO, float32"], got["sensitive, int4 base on disk"]
    assert full["of_full_zo"] == 1.0 and full["trained_values"] > 100 * disk["trained_values"] > 0
    assert disk["peak_rss_mib"] > 0 and abs(disk["of_full_zo"] - disk["peak_rss_mib"] / full["peak_rss_mib"]) < 0.01


def test_lr_scale_moves_each_form_at_its_own_lr_and_resumes_as_it_trained(mask, tiny_model_dir, data_file, tmp_path,
                                                                          capsys):
    def run(name, steps, lr, *extra):
        out = tmp_path / name
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--steps",
                     str(steps), *FAST, "run.eval_every=0", "run.keep=last", "--method", "zosgd", "--lr", lr,
                     f"model.trainable=final-norm+sensitive:{mask}", *extra]) == 0
        return out

    # one step from the same point has the same projected gradient at any lr: the norm moves as at lr
    # 1e-2, the mask's entries as at 1e-2 x 0.25 (a power of two: the same float as 2.5e-3)
    scaled = exported(run("scaled", 1, "1e-2", "method.lr_scale={sensitive: 0.25}"), tmp_path / "m0")
    at_lr = exported(run("at-lr", 1, "1e-2"), tmp_path / "m1")
    at_quarter = exported(run("at-quarter", 1, "2.5e-3"), tmp_path / "m2")
    masked = set(load_mask(mask)[0])
    for name, weight in scaled.items():
        assert torch.equal(weight, (at_quarter if name in masked else at_lr)[name]), name
    assert any(not torch.equal(scaled[k], at_lr[k]) for k in masked)  # the deltas did move at the smaller lr
    assert any(not torch.equal(scaled[k], at_quarter[k]) for k in scaled if k not in masked)
    # stopped and resumed: the run it would have been, each step recording both lrs
    whole = run("whole", 4, "1e-2", "method.lr_scale={sensitive: 0.25}")
    part = run("part", 2, "1e-2", "method.lr_scale={sensitive: 0.25}", "run.snapshot_every=2")
    assert main(["resume", str(part), "run.steps=4"]) == 0
    assert (part / "steps.log").read_bytes() == (whole / "steps.log").read_bytes()
    records, _, _ = decode_steps((whole / "steps.log").read_bytes())
    assert [r.lrs for r in records] == [[1e-2, 2.5e-3]] * 4  # the norm's group, then the deltas'
    for folder in (whole, part):  # and metrics.jsonl says both, after a resume too
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["lrs"] for r in rows if "loss" in r and "step" in r and "grads" in r] == [[1e-2, 2.5e-3]] * 4
    capsys.readouterr()
    both = f"model.trainable=final-norm+sensitive:{mask}"
    for bad, match, *extra in (("{last-blocks: 2}", "'last-blocks', not a form of model.trainable", both),
                               ("{sensitive: -1}", "must be a finite number >= 0", both),
                               ("{final-norm: 2}", "an adapter trains its own tensors", "adapter.kind=lora")):
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "x"),
                     *FAST, f"method.lr_scale={bad}", *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
