"""Trained tensors outside the blocks of a streamed model: used before block 0 only or after the last
block only, they are walked in place there (no copy per probe); used in both, they are copied per
probe. Either way streamed == resident bit for bit."""

import pytest
import torch

from conftest import tiny_model
from test_stream import assert_same, closure_for, evaluate, quiet, run
from zotune.methods import make_optimizer
from zotune.models import select_trainable
from zotune.stream import StreamConfig, stream_
from zotune.stream.outside import END, START


def _names(model, engine, pairs):
    index = {i: n for i, (n, _) in enumerate(select_trainable(model, "all"))}
    return {index[i] for i, _ in pairs}


@pytest.mark.parametrize("family, method", [("qwen2", dict(n_directions=2)), ("gpt_neox", dict(name="fzoo")),
                                            ("opt", dict()), ("gpt2", dict(name="fzoo"))])
def test_outside_tensors_walked_in_place_give_the_resident_bits(family, method):
    """Untied embeddings and head (qwen2, gpt_neox; FZOO: 9 probes), learned positions (opt, gpt2) and a
    head tied to the embeddings (opt, gpt2: copied per probe): streamed == resident over 3 steps."""
    assert_same(run(family, evals=True, **method), run(family, tier="cpu", evals=True, **method))


def test_the_segments_are_seen_and_nothing_used_in_one_is_copied(monkeypatch):
    """An untied model: the embeddings are walked in place before block 0, the final norm and the head
    after the last block, and no outside tensor is cloned for a probe (8 clones a step before)."""
    model = tiny_model("qwen2")
    params = [p for _, p in select_trainable(model, "all")]
    opt = make_optimizer("fzoo", params, seed=1, lr=1e-3, eps=1e-3)
    engine = stream_(model, StreamConfig(tier="cpu"), "cpu", **quiet)
    evaluate(model)  # the first forward shows which segment uses what
    engine.attach(opt)
    start, end, copied = engine._outside.split()
    assert _names(model, engine, start) == {"model.embed_tokens.weight"}
    assert _names(model, engine, end) == {"model.norm.weight", "lm_head.weight"} and not copied
    outside = {t.data_ptr() for _, t in engine.outside}
    clones = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.data_ptr() in outside) or clone(
        t, *a, **k))
    engine.step(opt, closure_for(model, 0))
    assert not any(clones)
    engine.close()


def test_a_tied_head_is_copied_per_probe():
    model = tiny_model("llama")  # embeddings tied to the head: used before block 0 and after the last
    params = [p for _, p in select_trainable(model, "all")]
    opt = make_optimizer("zosgd", params, seed=1, lr=1e-3, eps=1e-3)
    engine = stream_(model, StreamConfig(tier="cpu"), "cpu", **quiet)
    evaluate(model)
    engine.attach(opt)
    start, end, copied = engine._outside.split()
    assert _names(model, engine, copied) == {"model.embed_tokens.weight"} and not start
    assert _names(model, engine, end) == {"model.norm.weight"}
    engine.close()


def test_a_tensor_used_where_it_was_not_walked_stops_the_step_and_takes_it_back():
    """If a forward uses a tensor walked in place in another segment (a model whose use changes), the
    step raises and every tensor is back where it was: never a step computed on another probe's values."""
    model = tiny_model("qwen2")
    params = [p for _, p in select_trainable(model, "all")]
    opt = make_optimizer("zosgd", params, seed=1, lr=1e-3, eps=1e-3)
    engine = stream_(model, StreamConfig(tier="cpu"), "cpu", **quiet)
    evaluate(model)
    engine.attach(opt)
    head = id(model.lm_head.weight)
    engine._outside.used[head] = {START}  # as if an earlier forward had used the head before block 0
    before = [t.clone() for _, t in engine.outside]
    with pytest.raises(RuntimeError, match=f"walked in place {START} of the blocks, is used {END} of them"):
        engine.step(opt, closure_for(model, 0))
    assert all(torch.allclose(a, t, atol=1e-6) for a, (_, t) in zip(before, engine.outside))
    assert engine._outside.used[head] == {START, END}  # copied from now on
    assert torch.isfinite(engine.step(opt, closure_for(model, 0)))
    engine.close()
