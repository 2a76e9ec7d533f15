"""Stream folders (the disk tier): made from a live model, a checkpoint or a config, one block at a time.

A model larger than memory is never held whole: `prepare_folder` builds the model skeleton without
storage (accelerate's `init_empty_weights`), then materialises, fills and writes one block at a time,
either from the checkpoint's safetensors files (read tensor by tensor) or with fresh random weights
(the model's own `_init_weights`). `load_streamed` builds the skeleton again, loads only what lies
outside the blocks, and attaches the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.files import weights_identity
from zotune.models import DTYPES, find_block_list
from zotune.parallel import SOLO, Group
from zotune.precision import Precision
from zotune.quant import quantize_like_, quantized_note, standard_tensors
from zotune.stream.disk import DiskTier
from zotune.stream.engine import StreamEngine
from zotune.stream.format import DTYPE_NAMES, BlockWriter, record_source
from zotune.stream.transfers import hollow


def _block_layouts(layers: nn.ModuleList, storage: torch.dtype) -> list[list[tuple[str, tuple, torch.dtype]]]:
    """Each block's tensors: float ones stored as `storage`, quantized values (integers) as they are."""
    return [[(n, tuple(p.shape), storage if p.is_floating_point() else p.dtype) for n, p in block.named_parameters()]
            for block in layers]


def _outside_state(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Everything outside the blocks, each tied tensor once (it is tied again on loading)."""
    prefix, seen, out = path + ".", set(), {}
    for k, v in model.state_dict().items():
        if not k.startswith(prefix) and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


def write_folder(model: nn.Module, folder: str, storage: torch.dtype, blocks_path: str | None = None,
                 at_step: int = 0, log=print) -> None:
    """Write a live model's blocks (and the rest) to a new stream folder; its blocks are at step `at_step`."""
    path, layers = find_block_list(model, blocks_path)
    writer = BlockWriter(folder, model.config.to_dict(), path, _block_layouts(layers, storage), storage)
    for j, block in enumerate(layers):
        writer.write_block(j, dict(block.named_parameters()))
    writer.finish(_outside_state(model, path), at_step)
    log(f"wrote {len(layers)} blocks to {folder}")


def _skeleton(config):
    """The model with parameters on the meta device (no storage) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # so that a tied head is one parameter, stored once
    return model


def prepare_folder(folder: str, *, config=None, checkpoint: str | None = None, storage_dtype: str = "float32",
                   seed: int = 0, blocks_path: str | None = None, log=print) -> Path:
    """Create a stream folder from a checkpoint folder (safetensors) or from a config with random weights.

    Memory stays at about one block: each block is materialised, filled, written and dropped.
    """
    from transformers import AutoConfig

    if (config is None) == (checkpoint is None):
        raise ConfigError("give either a checkpoint folder or a config (for random weights)")
    storage = DTYPES[storage_dtype]
    tensors_of = None
    if checkpoint is not None:
        config = AutoConfig.from_pretrained(checkpoint)
        tensors_of = _SafetensorsReader(Path(checkpoint))
    model = _skeleton(config)
    path, layers = find_block_list(model, blocks_path)
    writer = BlockWriter(folder, config.to_dict(), path, _block_layouts(layers, storage), storage)
    gen_seed = torch.Generator().manual_seed(seed)

    def fill(module: nn.Module, prefix: str) -> None:
        module.to_empty(device="cpu")
        with torch.no_grad():
            if tensors_of is not None:
                for n, p in module.named_parameters():
                    p.copy_(tensors_of.get(f"{prefix}{n}"))
            else:  # the model's own initialisation, seeded per block so a folder is reproducible
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen_seed)))
                for sub in module.modules():
                    model._init_weights(sub)

    from tqdm import tqdm

    for j, block in enumerate(tqdm(layers, desc="prepare", unit="block")):
        fill(block, f"{path}.{j}.")
        writer.write_block(j, dict(block.named_parameters()))
        block.to("meta")  # drop the storage before the next block
    outside = [(n, p) for n, p in model.named_parameters() if not n.startswith(path + ".")]
    for n, p in outside:
        owner = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
        if p.device.type == "meta":
            _fill_param(owner, n.rsplit(".", 1)[-1], tensors_of, n, model)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    writer.finish(_outside_state(model, path))
    if checkpoint is not None:
        _copy_tokenizer(Path(checkpoint), Path(folder))
        record_source(Path(folder), checkpoint, weights_identity(checkpoint))
    log(f"prepared {len(layers)} blocks in {folder} ({DTYPE_NAMES[storage]})")
    return Path(folder)


def _fill_param(owner: nn.Module, name: str, tensors_of, full_name: str, model: nn.Module) -> None:
    """Materialise one parameter outside the blocks: from the checkpoint, or the model's init."""
    p = owner._parameters[name]
    new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
    owner._parameters[name] = new
    with torch.no_grad():
        if tensors_of is not None:
            new.copy_(tensors_of.get(full_name))
        else:
            model._init_weights(owner)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "generation_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


class _SafetensorsReader:
    """Reads single tensors by name from a checkpoint's safetensors files (never the whole model)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(f"{folder} has no safetensors weights (model.safetensors or its index)")
        self.folder, self.weight_map = folder, weight_map
        self._open = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map.get(name)
        if file is None:
            raise ConfigError(f"the checkpoint {self.folder} has no tensor {name!r}; was it saved by another "
                              f"architecture or transformers version?")
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), "pt")
        return self._open[file].get_tensor(name)


def folder_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        raise ConfigError(f"the stream folder {folder} has no tokenizer files; copy tokenizer.json and "
                          f"tokenizer_config.json of its model into it") from None


def is_stream_folder(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").exists()


def load_streamed(folder: str, device: torch.device | str = "cpu", compute_dtype: str = "float32",
                  prefetch: int = 1, group: Group = SOLO, log=print, accelerator=None):
    """(model, engine) for a stream folder: only what lies outside the blocks is loaded into memory.

    With a process group (`zotune.parallel.Group`), the ranks read the blocks in slices and one of them
    writes the folder (`DiskTier.join`).
    `accelerator`: as for `stream_`.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig


    tier = DiskTier(folder)
    manifest = tier.manifest
    config = AutoConfig.for_model(**manifest["config"])
    model = _skeleton(config)
    path, layers = find_block_list(model, manifest["blocks_path"])
    if len(layers) != len(tier):
        raise ConfigError(f"{folder} holds {len(tier)} blocks but its config builds {len(layers)}; prepare it again")
    for block, specs in zip(layers, tier.specs):  # a quantized base's blocks hold quantized linears
        quantize_like_(block, {s.name: s.dtype for s in specs})
    compute = DTYPES[compute_dtype]
    device = torch.device(device)
    rest = load_file(str(Path(folder) / "rest.safetensors"))
    for n, p in list(model.named_parameters()):
        owner = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
        short = n.rsplit(".", 1)[-1]
        if n.startswith(path + "."):
            dtype = compute if p.is_floating_point() else p.dtype
            owner._parameters[short] = nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(p.shape),
                                                    requires_grad=False)  # hollow until the block arrives
        elif n in rest:
            owner._parameters[short] = nn.Parameter(rest[n].to(device, compute), requires_grad=False)
        else:
            raise ConfigError(f"{folder}/rest.safetensors has no tensor {n!r}; prepare the folder again")
    for n, b in model.named_buffers():
        if n in rest:
            owner = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
            owner._buffers[n.rsplit(".", 1)[-1]] = rest[n].to(device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device).eval()
    storage = DTYPES[manifest["storage_dtype"]]
    precision = Precision.resolve(storage, compute)
    log(f"streaming {len(layers)} blocks from {folder}{quantized_note(layers)}: {precision.reason}")
    engine = StreamEngine(model, tier, layers, device, precision, prefetch, log, accelerator)
    engine.join(group)
    return model, engine


def export_streamed(model: nn.Module, engine, out: str | Path, log=print) -> Path:
    """Write a streamed model as a standard, sharded HF folder (one shard per block, then the rest),
    reading one block at a time from its tier: a model larger than memory exports."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine.flush()  # every block up to date on its tier
    path, layers = find_block_list(model)
    shards = len(layers) + 1
    weight_map, total = {}, 0
    for j, block in enumerate(layers):
        values, _ = engine.tier.read(j)
        params = engine.params[j]
        for n, p in params.items():  # bound for a moment: a quantized linear's weight is computed from them
            p.data = values[n].to(engine.precision.compute) if values[n].is_floating_point() else values[n]
        with torch.no_grad():
            tensors = {f"{path}.{j}.{n}": t.to(engine.precision.compute).contiguous()
                       for n, t in standard_tensors(block).items()}
        for p in params.values():
            p.data = hollow(p, engine.device)
        name = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del values, tensors
    rest = {k: v.detach().to("cpu").contiguous() for k, v in _outside_state(model, path).items()}
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, out / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    total += sum(t.numel() * t.element_size() for t in rest.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    log(f"wrote {len(layers)} blocks and the rest to {out}, one block in memory at a time")
    return out
