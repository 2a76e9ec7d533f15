"""Hugging Face Trainer integration: train with a zotune ZO method and keep the Trainer's own loop.

`ZOTrainer` overrides only two documented hooks: `create_optimizer` (a zotune method, with the
Trainer's learning rate, weight decay and seed) and `training_step` (the two perturbed forwards of
the micro-batch through the Trainer's own `compute_loss`, no backward). Everything else is the
Trainer's: gradient accumulation (every micro-batch of a window is probed along the same direction
and their losses add up as the Trainer scales them, so a window of k micro-batches gives the
projected gradient of the whole window), the lr scheduler, logging (`report_to` TensorBoard or W&B
when installed), evaluation, checkpoints (the optimizer state is a few integers) and resuming.
With several GPUs (DDP) each rank probes its own micro-batches and the probe losses are averaged
over the ranks (two floats a step), so every rank takes the same update. `fp16=True` is refused
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
from zotune.methods import ZOSGD, make_optimizer


class WindowedZO(torch.optim.Optimizer):
    """A ZO method driven one micro-batch at a time: `probe(loss_fn)` per micro-batch, `step()` per
    accumulation window. It shares the method's parameter groups (the scheduler sets their lr) and
    its state dict (the step seeds), so the Trainer schedules, saves and restores it as any optimizer.
    """

    def __init__(self, zo: ZOSGD):
        if zo.n_directions != 1 or zo.one_sided or not zo.streamable or type(zo).moves is not ZOSGD.moves:
            raise ConfigError(f"{type(zo).__name__} with these options takes other forwards than two probes along one "
                              f"direction; with the Trainer use zosgd, zosgd-momentum, zoadam or zosgd-sign, "
                              f"two-sided, one direction")
        super().__init__([{"params": g["params"]} for g in zo.param_groups], {})
        self.zo, self.param_groups, self.state = zo, zo.param_groups, zo.state
        self._params = zo.indexed()
        self._window: list | None = None  # [seed, sum of L+, sum of L-] of the window in progress

    @torch.no_grad()
    def probe(self, loss_fn) -> torch.Tensor:
        """L+ and L− of one micro-batch along the window's direction; returns their mean (detached)."""
        zo, eps = self.zo, self.zo.eps
        if self._window is None:
            self._window = [zo.begin(), 0.0, 0.0]
            offset = 0.0
        else:
            offset = -eps  # the previous micro-batch left θ − εz
        seed = self._window[0]
        try:
            zo.move(self._params, seed, 0, eps - offset)
            plus = zo._loss(loss_fn)
            zo.move(self._params, seed, 0, -2 * eps)
            minus = zo._loss(loss_fn)
            zo.check_finite([plus, minus])
        except BaseException:  # never leave θ perturbed: back to rest, the window is dropped
            self._abandon()
            raise
        self._window[1] += plus
        self._window[2] += minus
        return torch.tensor((plus + minus) / 2)

    def _abandon(self) -> None:
        if self._window is not None:
            self.zo.undo(self._params, self._window[0], {0: -self.zo.eps})
            self._window = None

    @torch.no_grad()
    def step(self, closure=None):
        """The update of the window: g = (ΣL+ − ΣL−) / 2ε, with the restore fused in."""
        if closure is not None:
            raise ConfigError("WindowedZO.step() takes no closure: the Trainer probes each micro-batch first")
        if self._window is None:
            return None
        seed, plus, minus = self._window
        self._window = None
        plus, minus = _mean_over_ranks([plus, minus], self._params[0][1].device if self._params else None)
        record = self.zo.finish(seed, [plus, minus])
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
                raise ConfigError(f"zo_options[{key!r}]: set it in TrainingArguments (learning_rate, weight_decay, seed)")
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
