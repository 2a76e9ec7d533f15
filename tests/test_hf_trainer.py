"""ZOTrainer: HF's Trainer loop with a ZO method. Gradient accumulation equals one big batch, the
loop logs, evaluates and saves, and resuming from a checkpoint equals the uninterrupted run."""

import pytest
import torch
from transformers import TrainingArguments

from conftest import tiny_model
from zotune.config import ConfigError
from zotune.hf import ZOTrainer
from zotune.methods import make_optimizer

LR, EPS = 1e-2, 1e-3


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 200, (n, 12), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.1."))
    return [p for p in model.parameters() if p.requires_grad]


def trainer(tmp_path, micro, accumulation, steps, method="zosgd", options=None, lr=LR, **extra):
    model = tiny_model("llama")
    trainable(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr,
                             lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, seed=5,
                             save_strategy="no", **extra)
    return ZOTrainer(model=model, args=args, train_dataset=Sequences(8), eval_dataset=Sequences(4, seed=1),
                     zo_method=method, zo_options={"eps": EPS, **(options or {})})


@pytest.mark.parametrize("method, options, lr",
                         [("zosgd", {}, LR), ("fzoo", {"n_directions": 3}, 1e-3), ("hizoo", {}, LR)])
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, method, options, lr):
    """4 steps, each a window of 2 x 4 sequences, against the method on all 8 at once with the same
    seeds: the same projected gradients within float rounding (two micro-batch means instead of one
    mean: ~1e-6 of a loss of 10.8, magnified by 1/2ε), so the same weights within 1e-4 (measured 3e-5
    for zosgd) where they moved 6e-3. Every probe walk (one-sided, several directions, a reference
    forward) goes through the Trainer as through `zotune train`. FZOO divides by the spread of its
    probe losses (~2e-4 here), so the same rounding is ~1% of its step: a 10x smaller lr keeps its
    weights as close."""
    t = trainer(tmp_path / "t", micro=4, accumulation=2, steps=4, method=method, options=options, lr=lr)
    t.train()
    reference = tiny_model("llama")
    params = trainable(reference)
    opt = make_optimizer(method, params, lr=lr, eps=EPS, seed=5, **options)
    batch = Sequences(8).ids
    for _ in range(4):
        opt.step(lambda: reference(input_ids=batch, labels=batch).loss)
    got = [p for p in t.model.parameters() if p.requires_grad]
    assert t.zo_optimizer.zo.steps == 4 and t.zo_optimizer.zo.last.seed == opt.last.seed
    n = opt.n_directions  # HiZOO's second entry is a second difference of the losses: rounding noise here
    assert t.zo_optimizer.zo.last.grads[:n] == pytest.approx(opt.last.grads[:n], rel=0.05)
    start = trainable(tiny_model("llama"))
    for a, b, s in zip(got, params, start):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert max(float((b - s).abs().max()) for b, s in zip(params, start)) > 0.002  # it moved 20x more than that
    logged = [h for h in t.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(h["loss"] > 0 for h in logged)


def test_the_trainer_evaluates_saves_and_resumes_exactly(tmp_path):
    kwargs = dict(eval_strategy="steps", eval_steps=2)
    whole = trainer(tmp_path / "whole", micro=4, accumulation=2, steps=4, **kwargs)
    whole.train()
    assert [h["eval_loss"] for h in whole.state.log_history if "eval_loss" in h]  # evaluation ran in the loop

    first = trainer(tmp_path / "parts", micro=4, accumulation=2, steps=4, **kwargs)
    first.args.save_strategy, first.args.save_steps = "steps", 2
    first.args.max_steps = 2
    first.train()
    second = trainer(tmp_path / "parts", micro=4, accumulation=2, steps=4, **kwargs)
    second.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-2"))
    for a, b in zip(whole.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)  # the optimizer state (step seeds) came back from the checkpoint


def test_methods_with_other_forwards_are_refused(tmp_path):
    t = trainer(tmp_path, micro=4, accumulation=1, steps=1)
    t.zo_method = "zosgd-conservative"
    with pytest.raises(ConfigError, match="not a walk of probes"):
        t.create_optimizer()
    with pytest.raises(ConfigError, match="set it in TrainingArguments"):
        ZOTrainer(model=tiny_model("llama"), args=t.args, zo_options={"lr": 1.0})


def test_fp16_loss_scaling_is_refused_with_one_line():
    from types import SimpleNamespace

    with pytest.raises(ConfigError, match="fp16=True .* use bf16=True"):
        ZOTrainer(model=tiny_model("llama"), args=SimpleNamespace(fp16=True))


def _rank(rank, world, port, out):
    import torch.distributed as dist

    from zotune.hf import WindowedZO
    from zotune.methods import make_optimizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = tiny_model("llama")
    opt = WindowedZO(make_optimizer("zosgd", trainable(model), seed=5, lr=LR, eps=EPS))
    ids = Sequences(8, seed=rank).ids  # each rank its own micro-batches
    opt.probe(lambda: model(input_ids=ids, labels=ids).loss)
    opt.step()
    out[rank] = (opt.zo.last.grads, [p.detach().clone() for p in trainable(model)])
    dist.destroy_process_group()


def test_ranks_of_a_multi_gpu_trainer_take_the_same_update():
    """DDP: each rank probes its own rows; the probe losses are averaged, so the ranks stay equal and
    the projected gradient is the mean of the ranks' own."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, port, out), nprocs=2)
    (g0, w0), (g1, w1) = out[0], out[1]
    assert g0 == g1 and all(torch.equal(a, b) for a, b in zip(w0, w1))
    alone = []
    for rank in range(2):  # each rank's projected gradient on its own, with no group
        from zotune.hf import WindowedZO
        from zotune.methods import make_optimizer

        model = tiny_model("llama")
        opt = WindowedZO(make_optimizer("zosgd", trainable(model), seed=5, lr=LR, eps=EPS))
        ids = Sequences(8, seed=rank).ids
        opt.probe(lambda: model(input_ids=ids, labels=ids).loss)
        opt.step()
        alone.append(opt.zo.last.grads[0])
    assert g0[0] == pytest.approx((alone[0] + alone[1]) / 2, rel=1e-9)
