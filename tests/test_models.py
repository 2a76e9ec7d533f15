"""A matrix over tiny random-weight decoder-only families: blocks, trainable subsets, prefix reuse, ZO."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from zotune import ZOSGD, ConfigError
from zotune.models import find_blocks, select_trainable
from zotune.prefix import FrozenPrefix
from zotune.tasks import ClassificationTask, Table, TaskConfig

EXAMPLES = Table([{"text": f"review number {i}: {'a wonderful, moving film' if i % 2 else 'a dull and tedious mess'}",
                   "label": "fresh" if i % 2 else "rotten"} for i in range(64)], "inline")


@pytest.fixture(scope="module")
def task(tokenizer):
    return ClassificationTask(TaskConfig(data="inline", verbalizer={"fresh": "great", "rotten": "terrible"}, n_dev=0,
                                         n_test=8), tokenizer, EXAMPLES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blocks_found_by_structure(family):
    model = tiny_model(family)
    blocks = find_blocks(model)
    assert len(blocks) == 3
    assert len({type(b).__name__ for _, b in blocks}) == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainable_subsets(family):
    model = tiny_model(family)
    last = select_trainable(model, "last-blocks:1")
    final = select_trainable(model, "final-norm")
    assert final and all(p.dim() == 1 for _, p in final)
    last_block = find_blocks(model)[-1][0]
    assert {n for n, _ in last} - {n for n, _ in final} == {n for n, _ in model.named_parameters()
                                                              if n.startswith(last_block + ".")}
    everything = select_trainable(model, "all")
    assert len({id(p) for _, p in everything}) == len(everything)  # tied weights listed once
    # BitFit: every module's bias (families without biases have none to train and say so)
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), torch.nn.Parameter)}
    if biases:
        assert {id(p) for _, p in select_trainable(model, "biases")} == biases
    else:
        with pytest.raises(ConfigError, match="selects no parameter"):
            select_trainable(model, "biases")
    # forms joined with +: their union, each tensor once, each form's tensors in turn
    union = select_trainable(model, "last-blocks:1+norms")
    assert [n for n, _ in union[:len(last)]] == [n for n, _ in last]
    assert {id(p) for _, p in union} == {id(p) for _, p in last} | {id(p) for _, p in select_trainable(model, "norms")}
    assert len({id(p) for _, p in union}) == len(union)
    # a module filter: by class from the CLI, by any function from Python
    cls = next(type(m) for m in dict(find_blocks(model))[last_block].modules() if list(m.parameters(recurse=False)))
    of_class = select_trainable(model, f"modules:Embedding,{cls.__name__}")
    assert {id(p) for _, p in of_class} == {id(p) for m in model.modules() if type(m) in (cls, torch.nn.Embedding)
                                            for p in m.parameters(recurse=False)}
    in_tail = select_trainable(model, lambda name, m: name.startswith(last_block + ".") and type(m) is cls)
    tail = {id(p) for n, p in last if n.startswith(last_block + ".")}
    assert in_tail and {id(p) for _, p in in_tail} == {id(p) for _, p in of_class} & tail


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_frozen_prefix_reuse_is_bit_exact(family, task):
    model = tiny_model(family)
    params = [p for _, p in select_trainable(model, "last-blocks:1")]
    prefix = FrozenPrefix.for_params(model, params)
    assert prefix is not None and prefix.k == 2
    batch = task.collate(task.train[:8])
    with torch.inference_mode():
        full = task.class_logits(model, batch)
        prefix.capture(lambda: task.class_logits(model, batch))
        with prefix.replaying():
            reused = task.class_logits(model, batch)
    assert torch.equal(full, reused)
    assert len(find_blocks(model)) == 3 and all(type(b).__name__ != "_Replay" for _, b in find_blocks(model))


def _probe_losses(model, task, batch, steps: int = 3):
    """(losses through the model's whole forward, losses through what `probe_model` hands the probes, its note)
    at the base and after `steps` moves of the final norm."""
    params = [p for _, p in select_trainable(model, "final-norm")]
    prefix = FrozenPrefix.for_params(model, params)
    assert prefix is not None and prefix.k == len(find_blocks(model))
    whole, probed = [], []
    with torch.inference_mode():
        prefix.capture(lambda: task.forward(model, batch))
        with prefix.replaying(), task.head(model, batch):
            stand_in = prefix.probe_model(model, lambda m: task.forward(m, batch))
            for k in range(steps):
                whole.append(task.head_loss(model, batch))
                probed.append(task.head_loss(stand_in, batch))
                for p in params:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)), alpha=0.1)
    return whole, probed, prefix.tail_note


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_probe_of_the_final_norm_runs_only_the_tail_and_gives_the_forwards_bits(family, task):
    model = tiny_model(family)
    whole, probed, note = _probe_losses(model, task, task.collate(task.train[:8]))
    assert "probes run only" in note and "whole" not in note
    assert all(torch.equal(a, b) for a, b in zip(whole, probed)) and len({float(x) for x in whole}) == 3


def test_a_tail_that_is_not_a_plain_chain_keeps_the_whole_forward(task):
    from transformers import AutoConfig, AutoModelForCausalLM

    # Gemma 2 soft-caps its logits in the forward, outside any module: the norm and head alone differ
    config = AutoConfig.for_model("gemma2", vocab_size=49152, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=8, intermediate_size=64,
                                  final_logit_softcapping=0.5, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    whole, probed, note = _probe_losses(model, task, task.collate(task.train[:8]))
    assert "differs from the forward" in note
    assert all(torch.equal(a, b) for a, b in zip(whole, probed))
    # a change made around the decoder's output (a hook on a container) is seen the same way
    model = tiny_model("llama")
    model.model.register_forward_hook(lambda m, a, out: out.__class__(last_hidden_state=out.last_hidden_state * 2))
    whole, probed, note = _probe_losses(model, task, task.collate(task.train[:8]))
    assert "whole forward" in note and all(torch.equal(a, b) for a, b in zip(whole, probed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zo_lowers_training_loss(family, task):
    model = tiny_model(family)
    params = [p for _, p in select_trainable(model, "last-blocks:1")]
    prefix = FrozenPrefix.for_params(model, params)
    opt = ZOSGD(params, lr=1e-1, eps=1e-3, seed=0)
    batch = task.collate(task.train[:16])

    def loss():
        with torch.inference_mode(), prefix.replaying():
            return task.loss(model, batch)

    prefix.capture(lambda: task.class_logits(model, batch))
    start = float(loss())
    for _ in range(60):
        opt.step(loss)
    assert float(loss()) < start - 0.05


def test_a_shared_store_serves_a_batchs_prefix_to_every_run_of_the_command(task):
    from zotune.prefix import PrefixStore

    store, batch, outputs, ran = PrefixStore(shared=True), task.collate(task.train[:4]), {}, []
    for run, spec in enumerate(("final-norm", "last-blocks:1", "final-norm", "last-blocks:1")):
        model = tiny_model("llama")  # a fresh load of the same base for each run, as each candidate has
        model.model.layers[0].register_forward_hook(lambda *a: ran.append(run))
        prefix = FrozenPrefix.for_params(model, [p for _, p in select_trainable(model, spec)], keep_bytes=1 << 20,
                                         store=store)
        prefix.capture(lambda: task.forward(model, batch), key="batch 0")
        outputs.setdefault(prefix.k, []).append(prefix.output)
        prefix.clear()  # the end of a run: a shared store keeps what it holds
    assert ran == [0, 1]  # each k computed once, by the first run that needed it
    assert set(outputs) == {3, 2} and all(torch.equal(a, b) for a, b in outputs.values())
    assert not torch.equal(outputs[3][0], outputs[2][0]) and len(store.kept) == 2


def test_prefix_refused_when_a_trainable_module_runs_early(task):
    model = tiny_model("llama")  # tied: the trainable LM head is also the input embedding
    params = [model.get_output_embeddings().weight] + [p for _, p in select_trainable(model, "last-blocks:1")]
    prefix = FrozenPrefix.for_params(model, params)
    with pytest.raises(RuntimeError, match="runs before block"):
        prefix.capture(lambda: task.class_logits(model, task.collate(task.train[:2])))


def test_unknown_trainable_spec_and_bad_blocks_path():
    model = tiny_model("opt")
    for bad in ("last-blocks:x", "last-blocks:0", "norms+", "modules:", "biases+everything"):
        with pytest.raises(ConfigError, match="not understood"):
            select_trainable(model, bad)
    combo = [n for n, _ in select_trainable(model, r"biases+re:fc[12]+\.weight")]  # a regex takes the rest, + included
    assert combo == [n for n, _ in select_trainable(model, "biases")] + [
        n for n, _ in model.named_parameters() if n.endswith(("fc1.weight", "fc2.weight"))]
    with pytest.raises(ConfigError, match="selects no parameter"):
        select_trainable(model, lambda name, m: False)
    with pytest.raises(ConfigError, match="selects no parameter"):
        select_trainable(model, "re:^nothing$")
    with pytest.raises(ConfigError, match="ModuleList"):
        find_blocks(model, "model.decoder.nope")


def test_real_model_loads_from_the_gguf_cache_and_knows_english(tokenizer):
    from zotune.models import ModelConfig, load_model

    lines = []
    model, tok = load_model(ModelConfig(), log=lines.append)  # the fixture converted it already
    assert not any("converting" in line for line in lines)
    sentence = "The cat sat on the mat because it was warm and comfortable there."
    shuffled = "mat comfortable The warm sat because and cat there. the on it was"

    def nll(text):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            return float(model(input_ids=ids, labels=ids).loss)
    assert nll(sentence) + 2.0 < nll(shuffled)


def test_missing_gguf_file_is_reported(tmp_path):
    from zotune.models import ModelConfig, resolve_source

    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(ModelConfig(name=str(tmp_path / "missing.gguf")))


def test_kept_prefix_is_reused_without_running_and_respects_its_budget(task):
    model = tiny_model("qwen2")
    params = [p for _, p in select_trainable(model, "last-blocks:1")]
    batches = [task.collate(task.train[i: i + 4]) for i in (0, 4)]
    prefix = FrozenPrefix.for_params(model, params, keep_bytes=10**9)
    runs = []

    def run(b):
        runs.append(1)
        return task.class_logits(model, b)
    prefix.capture(lambda: run(batches[0]), key=0)
    first = prefix.output
    prefix.capture(lambda: run(batches[1]), key=1)
    prefix.capture(lambda: run(batches[0]), key=0)
    assert len(runs) == 2 and prefix.output is first
    small = FrozenPrefix.for_params(model, params, keep_bytes=first.numel() * 4)  # room for one batch only
    small.capture(lambda: run(batches[0]), key=0)
    small.capture(lambda: run(batches[1]), key=1)
    small.capture(lambda: run(batches[1]), key=1)
    assert len(runs) == 5 and small.kept_bytes == first.numel() * 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_verbalizer_head_matches_the_full_vocabulary_head(family, task):
    model = tiny_model(family)
    head = model.get_output_embeddings()
    batch = task.collate(task.train[:8])
    with torch.inference_mode():
        fast = task.class_logits(model, batch)
        full = task.class_logits_full_head(model, batch)
    assert model.get_output_embeddings() is head  # the stand-in is gone after the forward
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)  # a 2-row matmul may round differently
