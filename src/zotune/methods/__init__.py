"""ZO methods: optimizers in the torch.optim style, each a small file that registers itself.

Adding a method (docs/adding-a-method.md): write `methods/<name>.py` with its config (a `MethodConfig`
subclass, when it has options of its own) and its optimizer class, end it with
`register_method("<name>", Config, Optimizer)`, import it below, and test it against a naive
reference of its update.
"""

from zotune.methods.registry import (DEFAULT_METHOD, METHODS, MethodConfig, list_methods, make_optimizer,  # noqa: I001
                                     method_config, not_a_walk, register_method, require_walk,
                                     unknown_method)
from zotune.methods.zosgd import ZOSGD, NonFiniteLossError, StepKey, StepPlan, StepRecord
from zotune.methods.variants import AdamConfig, MomentumConfig, ZOAdam, ZOMomentum, ZOSign
from zotune.methods.conservative import ZOConservative
from zotune.methods.hizoo import HiZOO, HiZOOConfig
from zotune.methods.forward_grad import ForwardGradient
from zotune.methods.sparse import SparseConfig, SparseMeZO
from zotune.methods.fzoo import FZOO, FZOOConfig
from zotune.methods.lozo import LOZO, LOZOConfig, LOZOMConfig
from zotune.methods.coordinate import CGE, CGEConfig

__all__ = ["CGE", "CGEConfig", "DEFAULT_METHOD", "FZOO", "LOZO", "METHODS", "ZOSGD", "AdamConfig", "FZOOConfig",
           "ForwardGradient",
           "HiZOO", "HiZOOConfig", "LOZOConfig", "LOZOMConfig", "MethodConfig", "MomentumConfig", "NonFiniteLossError",
           "SparseConfig", "SparseMeZO", "StepKey", "StepPlan", "StepRecord", "ZOAdam", "ZOConservative", "ZOMomentum",
           "ZOSign", "list_methods", "make_optimizer", "method_config", "not_a_walk", "register_method", "require_walk",
           "unknown_method"]
