"""Parameter-efficient setups through HF PEFT: the adapter's parameters are the ones that train.

LoRA targets PEFT's own default modules for the architecture unless `adapter.targets` names them.
The adapter is created right after the base model loads, from a seeded RNG (its A matrices start
random), so a resumed or replayed run rebuilds the same starting point; `zotune export` of such a
run writes the adapter (adapter_config.json + adapter_model.safetensors), loadable with PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zotune.config import ConfigError

KINDS = ("none", "lora")


@dataclass
class AdapterConfig:
    """kind: `none` (train `model.trainable`) or `lora` (train LoRA matrices of rank r; model.trainable unused)."""

    kind: str = "none"
    r: int = 8
    alpha: float = 16.0
    targets: str | None = None  # comma-separated module names, e.g. "q_proj,v_proj"; default: PEFT's

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"adapter.kind={self.kind!r} is not known; use one of {', '.join(KINDS)}")
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ConfigError(f"adapter.r={self.r} must be an integer >= 1 (e.g. 8)")
        if not self.alpha > 0:
            raise ConfigError(f"adapter.alpha={self.alpha} must be > 0 (e.g. 16)")


def apply_adapter(model: nn.Module, cfg: AdapterConfig, seed: int) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """(the model with its adapter, the adapter's (name, parameter) pairs), or the model unchanged."""
    if cfg.kind == "none":
        return model, []
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()] if cfg.targets else None
    devices = {p.device for p in model.parameters()}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # LoRA's A matrices: the same start on every run of this config
    try:
        peft_model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                      target_modules=targets))
    except ValueError as e:
        raise ConfigError(f"adapter.targets={cfg.targets!r}: {str(e).splitlines()[0]}") from None
    finally:
        torch.random.set_rng_state(state)
    if len(devices) == 1:
        peft_model.to(next(iter(devices)))
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    for _, p in peft_model.named_parameters():
        p.requires_grad_(False)  # forward passes only
    return peft_model.eval(), named
