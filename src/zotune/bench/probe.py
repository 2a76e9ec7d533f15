"""`zotune bench probe`: the default job's step (FZOO's 9 forwards on the final norm, the frozen prefix
kept), its probes run through the model's whole forward around the replayed blocks against the tail
alone (`FrozenPrefix.probe_model`), side by side in one run, on a random-weight model of a shape with
a large vocabulary, with the step's cost without any forward (the perturbation sweeps) beside them.
"""

from __future__ import annotations

import statistics
import time

import torch


def run_probe_bench(shape: str = "gemma-3-270m", batch: int = 64, repeats: int = 5, log=print) -> dict:
    from transformers import AutoModelForCausalLM

    from zotune.methods import METHODS
    from zotune.models import ModelConfig, load_model, select_trainable
    from zotune.prefix import FrozenPrefix
    from zotune.shapes import random_config
    from zotune.tasks import TaskConfig, make_task

    _, tokenizer = load_model(ModelConfig(), log=lambda *a: None)  # the default job's prompts, as token ids
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(random_config(shape)).eval().requires_grad_(False)
    task = make_task(TaskConfig(data="rotten_tomatoes"), tokenizer)
    data = task.collate(task.train[:batch])
    params = [p for _, p in select_trainable(model, "final-norm")]
    opt = METHODS["fzoo"][1](params, lr=0.0, eps=1e-3, seed=0)  # lr 0: timing only, the weights stay put
    prefix = FrozenPrefix.for_params(model, params, keep_bytes=1 << 30)
    prefix.capture(lambda: task.forward(model, data), key=0)
    notes: list[str] = []

    def step(probed):
        with prefix.replaying(), task.head(model, data):
            return opt.step(lambda: task.head_loss(probed(), data))

    def tail():
        return prefix.probe_model(model, lambda m: task.forward(m, data), notes.append)

    parts = {"step_whole_forward": lambda: step(lambda: model), "step_tail": lambda: step(tail),
             "step_no_forward": lambda: opt.step(lambda: torch.tensor(1.0))}
    for fn in parts.values():
        fn()  # warm-up (and the tail found)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {f"{name}_s": round(v, 4) for name, v in med.items()}
    result.update(shape=shape, batch=batch, vocab=model.config.vocab_size, tail=notes[0] if notes else "",
                  tail_speedup=round(med["step_whole_forward"] / med["step_tail"], 2),
                  sweeps_share_of_tail_step=round(med["step_no_forward"] / med["step_tail"], 3))
    log(f"{shape} (random weights, vocabulary {model.config.vocab_size:,}), a batch of {batch} prompts: the default "
        f"job's step (FZOO, 9 forwards, final norm)\n{notes[0] if notes else ''}")
    log(f"{'':36}{'seconds (median)':>17}")
    for name, text in (("step_whole_forward", "probes through the whole forward"),
                       ("step_tail", "probes through the tail"), ("step_no_forward", "the step without its forwards")):
        log(f"{text:36}{med[name]:>17.4f}")
    log(f"the tail is {result['tail_speedup']:.2f}x faster; the sweeps are {result['sweeps_share_of_tail_step']:.1%} "
        f"of its step")
    return result
