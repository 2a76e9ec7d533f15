"""Block streaming against the resident reference: same seeds and batches -> the same losses,
projected gradients and weights, bit for bit in float32, on both tiers and several families."""

import os

import pytest
import torch

from conftest import tiny_model
from zotune.config import ConfigError
from zotune.methods import make_optimizer
from zotune.models import select_trainable
from zotune.stream import DiskTier, StreamConfig, load_streamed, prepare_folder, stream_

quiet = dict(log=lambda *a: None)
BATCHES = [torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def closure_for(model, step):
    x = BATCHES[step % len(BATCHES)]
    return lambda: model(input_ids=x, labels=x).loss


def evaluate(model):
    with torch.inference_mode():
        return [float(model(input_ids=x, labels=x).loss) for x in BATCHES[:2]]


def run(family, steps=3, tier=None, folder=None, trainable="all", storage=None, evals=False, name="zosgd",
        accelerator=None, **method):
    """(losses, grads per step, evaluations, final trainable values) of a resident or streamed run
    (`accelerator`: the stream and copy calls of the engine, e.g. a fake one)."""
    model = tiny_model(family)
    if storage == "bfloat16":  # the resident reference starts from the same 16-bit values
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16).float()
    params = [p for _, p in select_trainable(model, trainable)]
    opt = make_optimizer(name, params, seed=1, **{"lr": 1e-3, "eps": 1e-3, **method})
    engine = None
    if tier:
        engine = stream_(model, StreamConfig(tier=tier, dir=str(folder) if folder else None, storage_dtype=storage),
                         "cpu", accelerator=accelerator, **quiet)
    losses, grads, evals_out = [], [], []
    for t in range(steps):
        step = (lambda c: engine.step(opt, c)) if engine else opt.step
        losses.append(float(step(closure_for(model, t))))
        grads.append(opt.last.grads)
        if evals:
            evals_out.append(evaluate(model))
    evals_out.append(evaluate(model))  # right after training: must see the last (pending) update
    if engine:
        values = [v.clone() for v in engine.trained_values()]
        engine.close()
    else:
        values = [p.detach().clone() for p in params]
    return losses, grads, evals_out, values


def assert_same(a, b):
    assert a[0] == b[0], "losses"
    assert a[1] == b[1], "projected gradients"
    assert a[2] == b[2], "evaluations"
    assert len(a[3]) == len(b[3]) and all(torch.equal(x, y) for x, y in zip(a[3], b[3])), "weights"


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("family", ["opt", "llama", "qwen2"])  # llama: embeddings tied to the head
def test_streamed_equals_resident(family, tier, tmp_path):
    folder = tmp_path / "blocks" if tier == "disk" else None
    assert_same(run(family), run(family, tier=tier, folder=folder))


@pytest.mark.parametrize("method", [dict(n_directions=2), dict(one_sided=True), dict(weight_decay=0.1),
                                    dict(distribution="rademacher"), dict(name="zosgd-sign", weight_decay=0.1)])
def test_streamed_equals_resident_for_every_move_pattern(method):
    assert_same(run("llama", **method), run("llama", tier="cpu", **method))


@pytest.mark.parametrize("trainable", ["last-blocks:1", "final-norm", "norms"])
def test_streamed_subsets_and_evaluation_between_steps(trainable, tmp_path):
    resident = run("qwen2", trainable=trainable, evals=True)
    assert_same(resident, run("qwen2", tier="disk", folder=tmp_path / "b", trainable=trainable, evals=True))


def test_16_bit_storage_keeps_float32_masters(tmp_path):
    """bf16 blocks, float32 compute: tiny updates survive (they would round away in bf16)."""
    method = dict(lr=1e-7, eps=1e-3)
    resident = run("llama", storage="bfloat16", **method)
    for tier in ("cpu", "disk"):
        streamed = run("llama", tier=tier, folder=tmp_path / tier, storage="bfloat16", **method)
        assert_same(resident, streamed)
    start = [p.data.to(torch.bfloat16).float() for p in tiny_model("llama").parameters()]
    a, b = torch.cat([t.view(-1) for t in start]), torch.cat([t.view(-1) for t in streamed[3]])
    assert (a != b).float().mean() > 0.9  # nearly every value moved in float32 ...
    assert (a.bfloat16() != b.bfloat16()).float().mean() < 0.05  # ... and would not have in bf16 (measured 0.014)


def _prepared(family, folder):
    model = tiny_model(family)
    model.save_pretrained(folder / "ckpt")
    prepare_folder(str(folder / "blocks"), checkpoint=str(folder / "ckpt"), **quiet)
    return folder / "blocks"


def test_prepared_folder_loads_without_the_blocks_and_matches(tmp_path):
    blocks = _prepared("llama", tmp_path)
    model, engine = load_streamed(str(blocks), **quiet)
    assert all(p.untyped_storage().nbytes() <= 4 for b in engine.layers for p in b.parameters())
    assert evaluate(model) == evaluate(tiny_model("llama"))
    engine.close()


def _train_on_folder(blocks, steps, records=(), stop_without_flush=False):
    model, engine = load_streamed(str(blocks), **quiet)
    params = [p for _, p in select_trainable(model, "last-blocks:2")]
    opt = make_optimizer("zosgd", params, seed=1, lr=1e-3)
    if records:  # what `zotune resume` does: seeds, then the tensors outside the blocks by replay
        opt.skip(records)
        outside = opt.indexed([p for p in params if not any(p is q for b in engine.layers for q in b.parameters())])
        for rec in records:
            opt.replay(rec, outside)
        engine.restore(records)
    records = list(records)
    for t in range(len(records), steps):
        engine.step(opt, closure_for(model, t))
        records.append(opt.last)
    if stop_without_flush:  # what a kill between steps leaves: written blocks, pending updates
        engine.wait()
        engine.tier.close()
        return records, None
    values = [v.clone() for v in engine.trained_values()]
    engine.close()
    return records, values


def test_disk_run_killed_between_steps_resumes_exactly(tmp_path):
    whole, killed = _prepared("llama", tmp_path / "a"), _prepared("llama", tmp_path / "b")
    reference_records, reference = _train_on_folder(whole, 5)
    records, _ = _train_on_folder(killed, 3, stop_without_flush=True)
    records, resumed = _train_on_folder(killed, 5, records=records)
    assert [r.grads for r in records] == [r.grads for r in reference_records]
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed))


def test_a_block_behind_the_log_catches_up_exactly(tmp_path):
    """A freshly prepared folder plus a run's log gives the run's weights (the remedy for a torn block)."""
    trained, fresh = _prepared("llama", tmp_path / "a"), _prepared("llama", tmp_path / "b")
    records, reference = _train_on_folder(trained, 3)
    _, rebuilt = _train_on_folder(fresh, 3, records=records)
    assert all(torch.equal(a, b) for a, b in zip(reference, rebuilt))


def test_a_write_cut_short_is_harmless_and_missing_or_foreign_shards_are_refused(tmp_path):
    """A kill inside a write-back hits the slot that is not current: the block stays whole."""
    blocks = _prepared("llama", tmp_path / "a")
    other = _prepared("qwen2", tmp_path / "b")
    records, reference = _train_on_folder(blocks, 2)
    tier = DiskTier(blocks)
    for j in tier.slots:  # garbage in the slot a write-back would use next, as a cut-short write leaves it
        spare = 1 - tier._record(j)[-1]
        for s in tier.slots[j]:
            f, offset = tier._place(j, s.name, spare)
            os.pwrite(f.fileno(), b"\xff" * s.nbytes, offset)
    tier.close()
    _, again = _train_on_folder(blocks, 2, records=records)
    assert all(torch.equal(a, b) for a, b in zip(reference, again))
    os.replace(blocks / "block-00002.bin", tmp_path / "kept.bin")
    with pytest.raises(ConfigError, match="block-00002.bin is missing"):
        DiskTier(blocks)
    (blocks / "block-00002.bin").write_bytes((other / "block-00002.bin").read_bytes())
    with pytest.raises(ConfigError, match="belongs to another model"):
        DiskTier(blocks)


def test_bad_offload_folders_are_refused_and_nothing_is_overwritten(tmp_path, monkeypatch):
    blocks = _prepared("llama", tmp_path)
    before = {p.name: p.read_bytes() for p in blocks.iterdir()}
    with pytest.raises(ConfigError, match="already holds a stream folder"):
        stream_(tiny_model("llama"), StreamConfig(tier="disk", dir=str(blocks)), **quiet)
    assert {p.name: p.read_bytes() for p in blocks.iterdir()} == before
    with pytest.raises(ConfigError, match="cannot write to /proc/zotune"):
        stream_(tiny_model("llama"), StreamConfig(tier="disk", dir="/proc/zotune/blocks"), **quiet)

    class Full:
        f_bavail, f_frsize = 10, 4096
    monkeypatch.setattr(os, "statvfs", lambda path: Full)
    with pytest.raises(ConfigError, match="GiB free but the blocks need"):
        stream_(tiny_model("llama"), StreamConfig(tier="disk", dir=str(tmp_path / "new")), **quiet)
    with pytest.raises(ConfigError, match="stream.tier=disk needs stream.dir"):
        StreamConfig(tier="disk")


def test_a_failed_step_leaves_the_weights_restored(tmp_path):
    """Ctrl-C (or any error) inside a probe: every block ends where it started, within float rounding."""
    model = tiny_model("llama")
    start = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    opt = make_optimizer("zosgd", params, seed=1, lr=1e-3)
    engine = stream_(model, StreamConfig(tier="disk", dir=str(tmp_path / "b")), **quiet)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        x = BATCHES[0]
        loss = model(input_ids=x, labels=x).loss
        if calls["n"] == 2:  # the second probe fails after every block has moved
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        engine.step(opt, closure)
    assert opt.steps == 0
    values = engine.trained_values()
    outside = {i for i, _ in engine.outside}  # the tied embedding and final norm: moves taken back
    for i, (a, b) in enumerate(zip(start, values)):
        if i in outside:
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
        else:
            assert torch.equal(a, b)  # blocks on disk: their slots from before the step, exactly
    engine.close()


@pytest.mark.parametrize("name", ["zoadam", "hizoo", "sparse-mezo"])
def test_a_failed_step_on_disk_leaves_the_optimizer_state_as_it_was(name, tmp_path):
    """A stateful method on the disk tier, a step that fails with block 1 in hand (its state on the
    device, already advanced by the settled update of the step before): the blocks and their state go
    back to their slots, and the run goes on exactly as a resident run that never took that step.
    Only block tensors train, so that nothing is taken back in place (which is exact only to rounding)."""
    def start():
        model = tiny_model("llama")
        params = [p for _, p in select_trainable(model, r"re:\.layers\.")]
        return model, params, make_optimizer(name, params, seed=1, lr=1e-3)

    model, params, opt = start()
    for t in range(4):
        if t == 2:
            opt.begin()  # the failed step's seed, drawn and never used
        opt.step(closure_for(model, t))
    reference = [p.detach().clone() for p in params]

    model, params, opt = start()
    engine = stream_(model, StreamConfig(tier="disk", dir=str(tmp_path / "b")), **quiet)
    entries = {"n": 0, "armed": False}

    def interrupt(module, args):
        if entries["armed"]:
            entries["n"] += 1
            if entries["n"] == 2:  # the second probe reaches block 1
                raise KeyboardInterrupt

    hook = engine.layers[1].register_forward_pre_hook(interrupt)
    for t in range(4):
        if t == 2:
            entries["armed"] = True
            with pytest.raises(KeyboardInterrupt):
                engine.step(opt, closure_for(model, t))
            entries["armed"] = False
            assert opt.steps == 2
        engine.step(opt, closure_for(model, t))
    hook.remove()
    values = engine.trained_values()
    assert not engine.outside and len(values) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(reference, values))
    engine.close()
