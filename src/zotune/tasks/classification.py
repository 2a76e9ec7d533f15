"""Classification with a prompt template and verbalizer words.

The loss is the cross-entropy over the verbalizer tokens' logits at the last prompt position
(MeZO's formulation); the metric is accuracy of the arg-max over the same logits.
"""

from __future__ import annotations

import contextlib
import os

import random
import string
from dataclasses import dataclass, field

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.tasks.sources import BUILTIN_DATA, Example


@dataclass
class TaskConfig:
    """What to learn: the data, how an example becomes a prompt, and the fixed seeded split.

    The split is fixed by `split_seed`: the data is shuffled once, test examples come first, then
    dev, then train, so changing a size never moves an example between splits.
    """

    data: str = "rotten_tomatoes"
    text_column: str = "text"
    label_column: str = "label"
    template: str = ""  # "": the built-in data set's own, else "{text} It was" (MeZO's SST-2 prompt)
    verbalizer: dict[str, str] = field(default_factory=dict)  # label -> word; {}: the built-in data set's own
    n_train: int = 1000  # MeZO's setting; 0: every example not in dev or test
    k_shot: int = 0  # > 0: train on k examples of each label instead (MeZO's k = 16 or 512), n_train unused
    n_dev: int = 200
    n_test: int = 500
    split_seed: int = 0
    max_length: int = 128
    objective: str = "loss"  # what ZO minimises: loss, accuracy, f1, or a function "module:name" / "file.py:name"

    def __post_init__(self):
        builtin = BUILTIN_DATA.get(self.data)
        if not self.template:
            self.template = builtin.template if builtin else "{text} It was"
        if not self.verbalizer:
            if builtin is None:
                raise ConfigError(f"task.verbalizer is needed for {self.data}: map every label to a word, "
                                  f"e.g. task.verbalizer={{pos: great, neg: terrible}}")
            self.verbalizer = dict(builtin.verbalizer)
        fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        if fields != ["text"]:
            bad = next((f for f in fields if f != "text"), None)
            why = f"has an unknown field {{{bad}}}" if bad is not None else "has no {text} field"
            raise ConfigError(f"task.template={self.template!r} {why}; use exactly one {{text}}, e.g. '{{text}} It was'")
        if not self.verbalizer or len(self.verbalizer) < 2:
            raise ConfigError("task.verbalizer needs at least two labels, e.g. {fresh: great, rotten: terrible}")
        empty = [k for k, v in self.verbalizer.items() if not str(v).strip()]
        if empty:
            raise ConfigError(f"task.verbalizer gives label {empty[0]!r} an empty word; give every label a word")
        for name in ("n_train", "n_dev", "n_test", "k_shot"):
            if getattr(self, name) < 0:
                raise ConfigError(f"task.{name}={getattr(self, name)} must be >= 0")
        if self.n_test < 1:
            raise ConfigError("task.n_test must be >= 1: accuracy before and after is measured on the test split")
        if self.max_length < 8:
            raise ConfigError(f"task.max_length={self.max_length} is too short for a prompt; use >= 8 tokens")
        objective_function(self.objective)  # fails here, before any work, when it cannot be found


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor  # index of the last real token of each row (right padding)
    labels: torch.Tensor  # class index into the verbalizer

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.last, self.labels)))

    def __len__(self) -> int:
        return len(self.labels)


class ClassificationTask:
    """Splits, tokenization, the verbalizer loss and batched accuracy for one classification task."""

    def __init__(self, cfg: TaskConfig, tokenizer, examples: list[Example]):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.labels = list(cfg.verbalizer)
        labels_seen = sorted({label for _, label in examples})
        unmapped = [label for label in labels_seen if label not in cfg.verbalizer]
        if unmapped:
            raise ConfigError(
                f"label {unmapped[0]!r} in {cfg.data} has no verbalizer word; add it to task.verbalizer "
                f"(labels in the data: {', '.join(labels_seen)})")
        self.label_token_ids = self._verbalizer_ids()
        self._objective = objective_function(cfg.objective)
        self._ids_on: dict[torch.device, torch.Tensor] = {}
        order = list(range(len(examples)))
        random.Random(cfg.split_seed).shuffle(order)
        shuffled = [examples[i] for i in order]
        if cfg.n_test + cfg.n_dev >= len(shuffled):
            raise ConfigError(
                f"{cfg.data} has {len(shuffled)} examples, too few for n_test={cfg.n_test} + n_dev={cfg.n_dev} "
                f"and a train split; lower task.n_test / task.n_dev")
        self.test = shuffled[: cfg.n_test]
        self.dev = shuffled[cfg.n_test: cfg.n_test + cfg.n_dev]
        train = shuffled[cfg.n_test + cfg.n_dev:]
        if cfg.k_shot:  # the first k of each label in the fixed shuffled order: balanced, seeded, nested in k
            by_label: dict[str, list[Example]] = {}
            for example in train:
                by_label.setdefault(example[1], []).append(example)
            short = [label for label in self.labels if len(by_label.get(label, [])) < cfg.k_shot]
            if short:
                raise ConfigError(f"task.k_shot={cfg.k_shot}: label {short[0]!r} has only "
                                  f"{len(by_label.get(short[0], []))} training examples in {cfg.data}; lower k_shot")
            chosen = {id(e) for label in self.labels for e in by_label[label][: cfg.k_shot]}
            self.train = [e for e in train if id(e) in chosen]
        else:
            self.train = train[: cfg.n_train] if cfg.n_train else train

    def _verbalizer_ids(self) -> list[int]:
        """First token of each verbalizer word as it follows the prompt (with a leading space)."""
        ids = []
        for label in self.labels:
            word = self.cfg.verbalizer[label]
            spaced = word if self.cfg.template.endswith((" ", "\n")) or word.startswith(" ") else " " + word
            tokens = self.tokenizer(spaced, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ConfigError(f"verbalizer word {word!r} of label {label!r} tokenizes to nothing; choose another word")
            ids.append(tokens[0])
        if len(set(ids)) < len(ids):
            raise ConfigError(
                f"verbalizer words {list(self.cfg.verbalizer.values())} share a first token; choose words that start differently")
        return ids

    def collate(self, examples: list[Example]) -> Batch:
        prompts = [self.cfg.template.format(text=text) for text, _ in examples]
        tok = self.tokenizer
        # Keep the end of long prompts: the template's suffix is where the answer is read.
        side, tok.truncation_side = tok.truncation_side, "left"
        try:
            enc = tok(prompts, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
        finally:
            tok.truncation_side = side
        mask = enc["attention_mask"]
        if tok.padding_side == "left":  # normalise to right padding: last real token at lengths - 1
            ids = torch.full_like(enc["input_ids"], tok.pad_token_id)
            lengths = mask.sum(1)
            new_mask = torch.zeros_like(mask)
            for r, n in enumerate(lengths.tolist()):
                ids[r, :n] = enc["input_ids"][r, mask.shape[1] - n:]
                new_mask[r, :n] = 1
            enc = {"input_ids": ids}
            mask = new_mask
        last = mask.sum(1) - 1
        labels = torch.tensor([self.labels.index(label) for _, label in examples])
        return Batch(enc["input_ids"], mask, last, labels)

    @contextlib.contextmanager
    def head(self, model: nn.Module, batch: Batch):
        """Within this block, the model's LM head computes only what the loss of `batch` needs.

        The loss needs one position per row and C vocabulary entries: a linear head is swapped
        (through HF's own `set_output_embeddings`) for one that projects each row's last position
        onto the verbalizer rows only. Any other head sees the last positions only, through a
        pre-hook, and projects onto the whole vocabulary. Installed once per step, it serves every
        probe's forward (probes may run in other threads: nothing changes while they run).
        """
        head = model.get_output_embeddings()
        if type(head) is nn.Linear:
            small = _VerbalizerHead(head, self._token_ids(head.weight.device), batch.last)
            try:
                model.set_output_embeddings(small)
            except (AttributeError, NotImplementedError):
                pass
            else:
                try:
                    yield
                finally:
                    model.set_output_embeddings(head)
                return
        rows = torch.arange(len(batch), device=batch.last.device)
        handle = head.register_forward_pre_hook(lambda module, args: (args[0][rows, batch.last].unsqueeze(1),) + args[1:])
        try:
            yield
        finally:
            handle.remove()

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, C) verbalizer logits from one forward, inside `head(model, batch)`."""
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = out.logits[:, -1]
        if logits.shape[-1] != len(self.label_token_ids):  # a full-vocabulary head
            logits = logits[:, self.label_token_ids]
        return logits.float()

    def head_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The objective from one forward, inside `head(model, batch)`: what a ZO closure computes."""
        return self._objective(self.logits(model, batch), batch.labels)

    def class_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, C) logits of the verbalizer tokens at each row's last real position."""
        with self.head(model, batch):
            return self.logits(model, batch)

    def class_logits_full_head(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The reference path: the whole vocabulary at each row's last position."""
        head = model.get_output_embeddings()
        rows = torch.arange(len(batch), device=batch.last.device)

        def pick_last(module, args):
            return (args[0][rows, batch.last].unsqueeze(1),) + tuple(args[1:])

        handle = head.register_forward_pre_hook(pick_last)
        try:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            handle.remove()
        return out.logits[:, -1, self.label_token_ids].float()

    def _token_ids(self, device) -> torch.Tensor:
        ids = self._ids_on.get(device)
        if ids is None:
            ids = self._ids_on[device] = torch.tensor(self.label_token_ids, device=device)
        return ids

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training objective of `batch` (cross-entropy unless `task.objective` says otherwise)."""
        return self._objective(self.class_logits(model, batch), batch.labels)

    def lengths(self, examples: list[Example]) -> list[int]:
        """Each example's prompt length in tokens, as `collate` truncates it."""
        prompts = [self.cfg.template.format(text=t) for t, _ in examples]
        return [min(len(ids), self.cfg.max_length) for ids in self.tokenizer(prompts)["input_ids"]]

    def batches(self, examples: list[Example], batch_size: int, by_length: bool = False):
        """Fixed-size batches; `by_length` groups similar lengths to cut padding (evaluation)."""
        if by_length:
            lengths = self.lengths(examples)
            examples = [examples[i] for i in sorted(range(len(examples)), key=lengths.__getitem__)]
        for start in range(0, len(examples), batch_size):
            yield self.collate(examples[start: start + batch_size])


class _VerbalizerHead(nn.Module):
    """Stands in for a linear LM head during one forward: each row's last real position, projected
    onto the verbalizer tokens' rows of the head's own (possibly perturbed or tied) weight."""

    def __init__(self, head: nn.Linear, token_ids: torch.Tensor, last: torch.Tensor):
        super().__init__()
        self._source = (head,)  # a tuple: not registered as a submodule, so the model's modules stay as they are
        self.token_ids, self.last = token_ids, last

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self._source[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, self.last].unsqueeze(1)
        bias = head.bias[self.token_ids] if head.bias is not None else None
        return nn.functional.linear(picked, head.weight[self.token_ids], bias)


def _error_rate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) != labels).float().mean()


def _one_minus_macro_f1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    predicted, scores = logits.argmax(-1), []
    for c in range(logits.shape[-1]):
        tp = ((predicted == c) & (labels == c)).sum()
        denominator = (predicted == c).sum() + (labels == c).sum()
        if denominator:  # a class absent from both the batch and the predictions does not count
            scores.append(2 * tp / denominator)
    return 1 - torch.stack(scores).mean()


OBJECTIVES = {"loss": lambda logits, labels: nn.functional.cross_entropy(logits, labels),
              "accuracy": _error_rate,  # minimised: 1 − accuracy
              "f1": _one_minus_macro_f1}  # minimised: 1 − macro F1


def objective_function(spec: str):
    """The function (class logits (B, C), labels (B,)) -> value to minimise that `task.objective` names.

    ZO needs only values, so any metric works, differentiable or not: accuracy and F1 are minimised
    as 1 − metric; "module:name" or "path/file.py:name" is a user function (e.g. a reward model's
    negated score), returning a float or a 0-d tensor.
    """
    if spec in OBJECTIVES:
        return OBJECTIVES[spec]
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"task.objective={spec!r}: use loss, accuracy, f1, or a function as module:name or file.py:name")
    import importlib
    import importlib.util

    try:
        if where.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location(f"zotune_objective_{abs(hash(where))}", where)
            if loader_spec is None or not os.path.isfile(where):
                raise ConfigError(f"task.objective={spec!r}: no file {where}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"task.objective={spec!r}: cannot import {where} ({e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"task.objective={spec!r}: {where} has no function {name!r}")
    return function
