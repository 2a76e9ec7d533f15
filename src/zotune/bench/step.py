"""`zotune bench step`: one ZO step / two plain forwards, zotune vs a straightforward MeZO step.

Both are measured side by side in one run, interleaved, on the same random-weight model and batch.
"""

from __future__ import annotations

import statistics
import time

import torch

from zotune.methods import ZOSGD
from zotune.shapes import SHAPES, random_config


def _model(shape: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(random_config(shape)).eval()


class MezoStep:
    """A straightforward MeZO step: four sweeps (+ε, −2ε, +ε, update), z regenerated each time from
    the re-seeded global RNG. `in_place=False` is MeZO's published code (`p.data = p.data + ...`,
    which allocates temporaries); `in_place=True` is the same algorithm with in-place adds."""

    def __init__(self, params, lr: float, eps: float, weight_decay: float = 0.0, in_place: bool = True):
        self.params, self.lr, self.eps, self.wd, self.in_place = list(params), lr, eps, weight_decay, in_place

    def _z(self, p):
        return torch.normal(mean=0, std=1, size=p.shape, device=p.device, dtype=p.dtype)

    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            if self.in_place:
                p.data.add_(self._z(p), alpha=scale * self.eps)
            else:
                p.data = p.data + scale * self._z(p) * self.eps

    @torch.no_grad()
    def step(self, closure) -> float:
        seed = int(torch.randint(0, 2**31, (1,)))
        self._perturb(seed, 1)
        plus = float(closure())
        self._perturb(seed, -2)
        minus = float(closure())
        self._perturb(seed, 1)
        g = (plus - minus) / (2 * self.eps)
        torch.manual_seed(seed)
        for p in self.params:
            z = self._z(p)
            wd = self.wd if p.dim() >= 2 else 0.0
            if self.in_place:
                p.data.add_(z, alpha=-self.lr * g)
            else:
                p.data = p.data - self.lr * (g * z + wd * p.data)
        return (plus + minus) / 2


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_step_bench(repeats: int = 7, batch: int = 4, seq: int = 128, shape: str = "opt-125m", log=print) -> dict:
    if shape not in SHAPES:
        from zotune.config import ConfigError
        raise ConfigError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    model = _model(shape)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    params = list(model.parameters())
    steps = {"zotune": ZOSGD(params, lr=1e-7, eps=1e-3, seed=0).step,  # the default: Rademacher directions
             "zotune_gaussian": ZOSGD(params, lr=1e-7, eps=1e-3, seed=0, distribution="gaussian").step,
             "mezo": MezoStep(params, lr=1e-7, eps=1e-3).step,
             "mezo_original": MezoStep(params, lr=1e-7, eps=1e-3, in_place=False).step}

    forward()  # warm-up
    for step in steps.values():
        step(forward)
    times: dict[str, list[float]] = {"two_forwards": [], **{name: [] for name in steps}}
    from zotune.methods import kernels

    log(f"OPT {shape} shape, {n_params / 1e6:.0f}M parameters, batch {batch} x {seq}, fp32, "
        f"{torch.get_num_threads()} threads, {repeats} interleaved repeats; Rademacher sweeps "
        + ("by the fused kernel (numba)" if kernels.available() else "eager (numba is not installed)"))
    for _ in range(repeats):
        times["two_forwards"].append(_timed(forward) + _timed(forward))
        for name, step in steps.items():
            times[name].append(_timed(lambda: step(forward)))
    fwd2_min, fwd2_med = min(times["two_forwards"]), statistics.median(times["two_forwards"])
    result = {"shape": shape, "parameters": n_params, "batch": batch, "seq": seq, "repeats": repeats,
              "two_forwards_s": round(fwd2_med, 4), "fused_kernel": kernels.available()}
    for name in steps:
        result[f"{name}_step_s"] = round(statistics.median(times[name]), 4)
        result[f"{name}_ratio"] = round(statistics.median(times[name]) / fwd2_med, 3)
        result[f"{name}_ratio_min"] = round(min(times[name]) / fwd2_min, 3)
    log(f"{'':18}{'step s (median)':>17}{'/ two forwards (median)':>25}{'(min / min)':>13}")
    log(f"{'two forwards':18}{fwd2_med:>17.3f}")
    for name in steps:
        step_s, ratio, ratio_min = (result[f"{name}_{key}"] for key in ("step_s", "ratio", "ratio_min"))
        log(f"{name:18}{step_s:>17.3f}{ratio:>25.2f}{ratio_min:>13.2f}")
    return result


def run_task_bench(repeats: int = 5, log=print) -> dict:
    """Training blocks on Rotten Tomatoes with SmolLM2 (`examples/rotten_tomatoes_blocks.yaml`: the
    last 2 blocks, MeZO's prompt, as measured in docs/performance.md): a ZO step / two plain forwards
    of the same classification head, with the frozen prefix recomputed every step and kept across
    epochs, and tokens per second."""
    from zotune.models import ModelConfig, load_model, select_trainable
    from zotune.prefix import FrozenPrefix
    from zotune.tasks import TaskConfig, make_task

    model_cfg = ModelConfig(trainable="last-blocks:2")
    task_cfg = TaskConfig(data="rotten_tomatoes", template="{text} It was",
                          verbalizer={"fresh": "great", "rotten": "terrible"})
    model, tokenizer = load_model(model_cfg, log=lambda *a: None)
    task = make_task(task_cfg, tokenizer)
    params = [p for _, p in select_trainable(model, model_cfg.trainable)]
    batch = task.collate(task.train[:16])
    tokens = int(batch.attention_mask.sum())
    opt = ZOSGD(params, lr=0.0, eps=1e-3, seed=0)  # lr 0: timing only, the weights stay put
    prefix = FrozenPrefix.for_params(model, params, keep_bytes=1 << 30)

    def forward():
        with torch.inference_mode():
            return task.loss(model, batch)

    def step_recomputed():
        prefix.capture(lambda: task.forward(model, batch))
        opt.step(lambda: _replaying(prefix, task, model, batch))

    def step_kept():
        prefix.capture(lambda: task.forward(model, batch), key=0)
        opt.step(lambda: _replaying(prefix, task, model, batch))

    for fn in (forward, step_recomputed, step_kept):
        fn()  # warm-up (and the first capture of the kept prefix)
    times: dict[str, list[float]] = {"two_forwards": [], "step_full": [], "step_recomputed": [], "step_kept": []}
    for _ in range(repeats):
        times["two_forwards"].append(_timed(forward) + _timed(forward))
        times["step_full"].append(_timed(lambda: opt.step(forward)))
        times["step_recomputed"].append(_timed(step_recomputed))
        times["step_kept"].append(_timed(step_kept))
    med = {k: statistics.median(v) for k, v in times.items()}
    dev = task.dev
    t = time.perf_counter()
    with torch.inference_mode():
        eval_tokens = 0
        for b in task.batches(dev, 32, by_length=True):
            task.class_logits(model, b)
            eval_tokens += int(b.attention_mask.sum())
    eval_seconds = time.perf_counter() - t
    result = {"task_two_forwards_s": round(med["two_forwards"], 4)}
    for name in ("step_full", "step_recomputed", "step_kept"):
        result[f"task_{name}_ratio"] = round(med[name] / med["two_forwards"], 3)
    result["train_tokens_per_s"] = round(tokens / med["step_kept"], 1)
    result["eval_tokens_per_s"] = round(eval_tokens / eval_seconds, 1)
    log(f"\nSmolLM2-135M, Rotten Tomatoes: batch of 16 prompts ({tokens} tokens), last 2 blocks + final norm trainable")
    log(f"{'':34}{'seconds (median)':>17}{'/ two forwards':>16}")
    log(f"{'two plain forwards':34}{med['two_forwards']:>17.3f}")
    for name, text in (("step_full", "step, two full forwards"), ("step_recomputed", "step, prefix once per step"),
                       ("step_kept", "step, prefix kept across epochs")):
        log(f"{text:34}{med[name]:>17.3f}{result[f'task_{name}_ratio']:>16.2f}")
    log(f"training {result['train_tokens_per_s']:.0f} tokens/s (prefix kept); "
        f"evaluation {result['eval_tokens_per_s']:.0f} tokens/s ({len(dev)} dev prompts, batch 32)")
    return result


def _replaying(prefix, task, model, batch):
    with prefix.replaying():
        return task.loss(model, batch)
