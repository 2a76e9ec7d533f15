"""Parameter-efficient setups through HF PEFT: the adapter's parameters are the ones that train.

LoRA targets PEFT's own default modules for the architecture unless `adapter.targets` names them.
Prefix tuning (PEFT's PrefixTuning) trains `adapter.tokens` keys and values in front of every
layer's attention; they start as the keys and values the model itself computes for that many real
tokens (MeZO's initialisation: "prefix initialised from real activations"), drawn from the
vocabulary by the run's seed, or at random (`adapter.init=random`, PEFT's own).
The adapter is created right after the base model loads, from a seeded RNG, so a resumed or
replayed run rebuilds the same starting point; `zotune export` of such a run writes the adapter
(adapter_config.json + adapter_model.safetensors), loadable with PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zotune.config import ConfigError

KINDS = ("none", "lora", "prefix", "tt")
OPTIONS = {"lora": ("r", "alpha", "targets", "last_blocks"), "prefix": ("tokens", "init"),
           "tt": ("r", "targets", "cores", "last_blocks")}


@dataclass
class AdapterConfig:
    """kind: `none` (train `model.trainable`), `lora` (LoRA matrices of rank r), `prefix` (prefix
    tuning: `tokens` keys and values per layer) or `tt` (AdaZeta's tensor-train adapters: `cores`
    cores of rank r, `zotune.tt_adapter`); with an adapter, model.trainable is unused."""

    kind: str = "none"
    r: int = 8  # LoRA
    alpha: float = 16.0  # LoRA
    targets: str | None = None  # LoRA: comma-separated module names, e.g. "q_proj,v_proj"; default: PEFT's
    tokens: int = 5  # prefix: virtual tokens per layer (MeZO's 5)
    init: str = "real"  # prefix: "real" (the model's own keys and values of real tokens) or "random"
    cores: int = 3  # tt: cores in each adapted matrix's tensor train (its rank is r)
    last_blocks: int = 0  # lora, tt: adapt only the last N blocks (their inputs are then a frozen prefix); 0: all

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"adapter.kind={self.kind!r} is not known; use one of {', '.join(KINDS)}")
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ConfigError(f"adapter.r={self.r} must be an integer >= 1 (e.g. 8)")
        if not self.alpha > 0:
            raise ConfigError(f"adapter.alpha={self.alpha} must be > 0 (e.g. 16)")
        if not (isinstance(self.tokens, int) and self.tokens >= 1):
            raise ConfigError(f"adapter.tokens={self.tokens} must be an integer >= 1 (e.g. 5)")
        if self.init not in ("real", "random"):
            raise ConfigError(f"adapter.init={self.init!r}: use real (activations of real tokens) or random")
        if not (isinstance(self.cores, int) and 2 <= self.cores <= 8):
            raise ConfigError(f"adapter.cores={self.cores} must be an integer from 2 to 8 (e.g. 3)")
        if not (isinstance(self.last_blocks, int) and not isinstance(self.last_blocks, bool) and self.last_blocks >= 0):
            raise ConfigError(f"adapter.last_blocks={self.last_blocks} must be an integer >= 0 (0: every block; "
                              f"e.g. 2 for the last two)")
        defaults = AdapterConfig.__dataclass_fields__
        for kind, options in OPTIONS.items():
            stray = [o for o in options if getattr(self, o) != defaults[o].default and self.kind not in
                     [k for k, read in OPTIONS.items() if o in read]]
            if stray:
                raise ConfigError(f"adapter.{stray[0]}={getattr(self, stray[0])} is an option of adapter.kind={kind}, "
                                  f"but adapter.kind={self.kind}: it would have no effect; set adapter.kind={kind}, "
                                  f"or drop adapter.{stray[0]}")

    def describe(self) -> str:
        where = (self.targets or "PEFT default modules") + (f" of the last {self.last_blocks} blocks"
                                                             if self.last_blocks else "")
        if self.kind == "tt":
            return f"tensor-train adapters, {self.cores} cores of rank {self.r} on {where}"
        if self.kind == "lora":
            return f"LoRA r={self.r} on {where}"
        return f"prefix tuning, {self.tokens} tokens per layer, {self.init} initialisation"


def apply_adapter(model: nn.Module, cfg: AdapterConfig, seed: int,
                  blocks_path: str | None = None) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """(the model with its adapter, the adapter's (name, parameter) pairs), or the model unchanged."""
    if cfg.kind == "none":
        return model, []
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()] if cfg.targets else None
    if cfg.last_blocks:
        targets = in_last_blocks(model, targets or default_targets(model, cfg.kind), cfg.last_blocks, blocks_path)
    if cfg.kind == "tt":
        from zotune.tt_adapter import apply_tt

        return apply_tt(model, cfg.r, cfg.cores, targets or default_targets(model, "tt"), seed)
    devices = {p.device for p in model.parameters()}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # LoRA's A matrices, a random prefix: the same start on every run of this config
    try:
        if cfg.kind == "lora":
            peft_config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets)
        else:
            peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.tokens)
        real = prefix_from_real_tokens(model, cfg.tokens, seed) if cfg.kind == "prefix" and cfg.init == "real" else None
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:
        raise ConfigError(f"adapter.targets={cfg.targets!r}: {str(e).splitlines()[0]}") from None
    finally:
        torch.random.set_rng_state(state)
    if real is not None:
        with torch.no_grad():
            peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight.copy_(real)
    if len(devices) == 1:
        peft_model.to(next(iter(devices)))
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    for _, p in peft_model.named_parameters():
        p.requires_grad_(False)  # forward passes only
    return peft_model.eval(), named


def default_targets(model: nn.Module, kind: str) -> list[str]:
    """PEFT's default LoRA modules for the model's architecture (what LoRA and `tt` adapt unless told)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not DEFAULTS.get(model_type):
        raise ConfigError(f"adapter.kind={kind}: no default modules are known for model type {model_type!r}; name "
                          f"them with adapter.targets (e.g. adapter.targets=q_proj,v_proj)")
    return list(DEFAULTS[model_type])


def in_last_blocks(model: nn.Module, targets: list[str], last_blocks: int, blocks_path: str | None) -> list[str]:
    """The full names of the linears named `targets` in the model's last `last_blocks` blocks (found by
    structure), so that the blocks before them stay frozen and their outputs are computed once per batch."""
    from zotune.models import find_block_list

    path, layers = find_block_list(model, blocks_path)
    if last_blocks > len(layers):
        raise ConfigError(f"adapter.last_blocks={last_blocks}, but this model has {len(layers)} blocks; use at most "
                          f"{len(layers)} (or 0 for every block)")
    names = [f"{path}.{i}.{name}" for i in range(len(layers) - last_blocks, len(layers))
             for name, module in layers[i].named_modules()
             if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets]
    if not names:
        raise ConfigError(f"adapter.targets={','.join(targets)}: no nn.Linear of the last {last_blocks} blocks has "
                          f"that name; name modules they have (e.g. q_proj,v_proj)")
    return names


@torch.no_grad()
def prefix_from_real_tokens(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    """PEFT's prefix table (n, layers x 2 x key/value width) holding the keys and values the model
    computes for n tokens drawn from its vocabulary by `seed`.

    PEFT reads row t of the table as layer l's key (columns [2l]) and value ([2l + 1]) for virtual
    token t, each (heads, head dim) flattened; the model's cache holds them as (1, heads, n, head dim).
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, n), generator=gen).to(device)
    was_training = model.training
    model.eval()
    cache = model(input_ids=ids, use_cache=True).past_key_values
    model.train(was_training)
    columns = []
    for layer in cache.layers:
        for kv in (layer.keys, layer.values):
            columns.append(kv[0].permute(1, 0, 2).reshape(n, -1))  # (heads, n, dim) -> (n, heads x dim)
    return torch.cat(columns, 1)
