"""zotune: fine-tune language models with forward passes only, at inference-level memory."""

from zotune.config import ConfigError
from zotune.methods import ZOSGD, MethodConfig, NonFiniteLossError, StepRecord, list_methods, make_optimizer

__version__ = "0.1.0"
__all__ = ["ConfigError", "MethodConfig", "NonFiniteLossError", "StepRecord", "ZOSGD", "list_methods",
           "make_optimizer"]
