"""Hugging Face Trainer integration: train with a zotune ZO method and keep the Trainer's own loop.

`ZOTrainer` overrides only two documented hooks: `create_optimizer` (a zotune method, with the
Trainer's learning rate, weight decay and seed) and `training_step` (the method's probe forwards of
the micro-batch through the Trainer's own `compute_loss`, no backward: the same walk as `zotune train`).
Everything else is the
Trainer's: gradient accumulation (every micro-batch of a window is probed along the same directions
and their losses add up as the Trainer scales them, so a window of k micro-batches gives the
projected gradient of the whole window), the lr scheduler, logging (`report_to` TensorBoard or W&B
when installed), evaluation, checkpoints (the optimizer state is a few integers) and resuming.
With several GPUs (DDP) each rank probes its own micro-batches and the probe losses are averaged
over the ranks (one float per probe a step), so every rank takes the same update. `fp16=True` is refused
(it scales a loss for a backward pass that ZO never takes); `bf16=True` autocasts as usual.

    trainer = ZOTrainer(model=model, args=TrainingArguments(..., learning_rate=1e-6), train_dataset=ds,
                        zo_method="zosgd", zo_options={"eps": 1e-3})
    trainer.train()

See examples/hf_trainer.py for a runnable script.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from zotune.config import ConfigError
from zotune.methods import ZOSGD, make_optimizer, require_walk


class WindowedZO(torch.optim.Optimizer):
    """A ZO method driven one micro-batch at a time: `probe(loss_fn)` per micro-batch, `step()` per
    accumulation window. It shares the method's parameter groups (the scheduler sets their lr) and
    its state dict (the step seeds), so the Trainer schedules, saves and restores it as any optimizer.
    """

    def __init__(self, zo: ZOSGD):
        require_walk(type(zo), "run by the HF Trainer", "use a method whose step is its probes (zosgd, zoadam, "
                     "fzoo, lozo, ...)")
        super().__init__([{"params": g["params"]} for g in zo.param_groups], {})
        self.zo, self.param_groups, self.state = zo, zo.param_groups, zo.state
        self._params = zo.indexed()
        self._window: tuple | None = None  # (step key, per-probe sums of the losses) of the window in progress

    @torch.no_grad()
    def probe(self, loss_fn) -> torch.Tensor:
        """Every probe of the step on one micro-batch, the same directions for the whole window (the
        method's own walk); returns the mean of its probe losses (detached)."""
        zo = self.zo
        if self._window is None:
            self._window = (zo.begin(), [0.0] * zo.n_probes)
        else:  # the previous micro-batch's walk left θ moved: back to rest before walking again
            zo.undo(self._params, self._window[0], zo.offsets(self._window[0].step))
        key, sums = self._window
        offsets: dict[int, float] = {}
        losses: list[float] = []
        try:
            for _ in zo.walk(self._params, key, offsets):
                losses.append(zo._loss(loss_fn))
                zo.check_finite(losses)
        except BaseException:  # never leave θ perturbed: back to rest, the window is dropped
            zo.undo(self._params, key, offsets)
            self._window = None
            raise
        for r, loss in enumerate(losses):
            sums[r] += loss
        return torch.tensor(sum(losses) / len(losses))

    @torch.no_grad()
    def step(self, closure=None):
        """The update of the window, from each probe's loss summed over its micro-batches (for ZO-SGD:
        g = (ΣL+ − ΣL−) / 2ε, the restore fused in)."""
        if closure is not None:
            raise ConfigError("WindowedZO.step() takes no closure: the Trainer probes each micro-batch first")
        if self._window is None:
            return None
        key, sums = self._window
        self._window = None
        sums = _mean_over_ranks(sums, self._params[0][1].device if self._params else None)
        record = self.zo.finish(key, sums)
        self.zo.update(self._params, record)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # there are no gradients

    def state_dict(self):
        return self.zo.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.zo.load_state_dict(state_dict)


def _mean_over_ranks(values: list[float], device) -> list[float]:
    """The mean of `values` over the data-parallel ranks of a multi-GPU Trainer run (DDP): every rank
    probed its own micro-batches along the same direction, and must take the same update."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    on = device if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


class ZOTrainer(Trainer):
    """`transformers.Trainer` with a zotune ZO method in place of backprop (see the module docstring).

    `zo_method`: a name from `zotune.list_methods()`; `zo_options`: its options (eps, distribution,
    momentum, ...). lr, weight decay and seed come from the `TrainingArguments`.
    """

    def __init__(self, *args, zo_method: str = "zosgd", zo_options: dict | None = None, **kwargs):
        self.zo_method, self.zo_options = zo_method, dict(zo_options or {})
        for key in ("lr", "weight_decay", "seed"):
            if key in self.zo_options:
                raise ConfigError(f"zo_options[{key!r}]: set it in TrainingArguments "
                                  "(learning_rate, weight_decay, seed)")
        training_args = kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if getattr(training_args, "fp16", False):
            raise ConfigError("fp16=True makes the Trainer scale a loss for backward, and ZO has no backward: use "
                              "bf16=True (autocast, no loss scaling), or load the model in float16 with fp16=False")
        super().__init__(*args, **kwargs)
        self.zo_optimizer: WindowedZO | None = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            params = [p for p in (model or self.model).parameters() if p.requires_grad]
            zo = make_optimizer(self.zo_method, params, seed=self.args.seed, lr=self.args.learning_rate,
                                weight_decay=self.args.weight_decay, **self.zo_options)
            self.optimizer = self.zo_optimizer = WindowedZO(zo)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.eval()  # no dropout: both probes must evaluate the same function (as MeZO)
        inputs = self._prepare_inputs(inputs)
        scaled = self.loss_is_scaled_for_ga if getattr(self, "loss_is_scaled_for_ga", None) is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

        def loss():
            with self.compute_loss_context_manager():
                value = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            # as the Trainer scales it: the losses of a window's micro-batches add up to the window's loss
            return value if scaled else value / self.current_gradient_accumulation_steps

        return self.zo_optimizer.probe(loss).to(self.args.device)
