"""Classification with a prompt template and verbalizer words.

The loss is the cross-entropy over the verbalizer tokens' logits at the last prompt position
(MeZO's formulation); the metric is accuracy of the arg-max over the same logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.tasks.base import Movable, Task, TaskConfig, load_function
from zotune.tasks.sources import Table


@dataclass
class Batch(Movable):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor  # index of the last real token of each row (right padding)
    labels: torch.Tensor  # class index into the verbalizer

    def __len__(self) -> int:
        return len(self.labels)


class ClassificationTask(Task):
    """Prompts, the verbalizer loss, accuracy and macro F1 for one classification task.

    An example is (prompt, label name).
    """

    def __init__(self, cfg: TaskConfig, tokenizer, table: Table):
        self.labels = list(cfg.verbalizer)
        self._label_type = None
        self._objective = CLASS_OBJECTIVES.get(cfg.objective) or load_function(cfg.objective, "task.objective")
        self._ids_on: dict[torch.device, torch.Tensor] = {}
        super().__init__(cfg, tokenizer, table)

    def bind(self, tokenizer) -> None:
        super().bind(tokenizer)
        self.label_token_ids = self._verbalizer_ids()
        self._ids_on.clear()

    def example(self, row: dict, where: str) -> tuple[str, str]:
        label = self.column(row, self.cfg.label_column, where)
        kind = type(label).__name__
        if self._label_type is None:
            self._label_type = (kind, where)
        elif kind != self._label_type[0]:
            raise ConfigError(f"{where}: label {label!r} is a {kind}, but the label of {self._label_type[1]} "
                              f"is a {self._label_type[0]}; give every label the same type")
        index = self.label_index(label) if self.cfg.label_names else None
        if index is not None:
            if index >= len(self.cfg.label_names):
                raise ConfigError(f"{where}: label {label} has no name: task.label_names has "
                                  f"{len(self.cfg.label_names)} ({', '.join(self.cfg.label_names)})")
            label = self.cfg.label_names[index]
        label = str(label)
        if label not in self.cfg.verbalizer:
            raise ConfigError(f"{where}: label {label!r} has no verbalizer word; add it to task.verbalizer "
                              f"(it maps {', '.join(self.cfg.verbalizer)})")
        return self.render(self.cfg.template, row, where), label

    def check_splits(self) -> list[str]:
        labels = sorted({label for _, label in self.train})
        one = [f"the training examples hold one label only ({labels[0]!r}): the model can learn only to answer it; "
               f"give rows of every label ({', '.join(self.cfg.verbalizer)})"] if len(labels) == 1 else []
        return one + super().check_splits()

    def k_shot(self, train: list) -> list:
        """The first k of each label in the fixed shuffled order: balanced, seeded, nested in k."""
        k = self.cfg.k_shot
        by_label: dict[str, list] = {}
        for example in train:
            by_label.setdefault(example[1], []).append(example)
        short = [label for label in self.labels if len(by_label.get(label, [])) < k]
        if short:
            raise ConfigError(f"task.k_shot={k}: label {short[0]!r} has only {len(by_label.get(short[0], []))} "
                              f"training examples in {self.cfg.train or self.cfg.data}; lower k_shot")
        chosen = {id(e) for label in self.labels for e in by_label[label][:k]}
        return [e for e in train if id(e) in chosen]

    def _verbalizer_ids(self) -> list[int]:
        """First token of each verbalizer word as it follows the prompt (with a leading space); a word of
        several tokens is named in the start-up notes."""
        ids, longer = [], []
        for label in self.labels:
            word = self.cfg.verbalizer[label]
            spaced = word if self.cfg.template.endswith((" ", "\n")) or word.startswith(" ") else " " + word
            tokens = self.tokenizer(spaced, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ConfigError(f"verbalizer word {word!r} of label {label!r} tokenizes to "
                                  "nothing; choose another word")
            ids.append(tokens[0])
            if len(tokens) > 1:
                longer.append(f"{word!r} ({len(tokens)} tokens)")
        note = (f"verbalizer word{'s' if len(longer) > 1 else ''} {', '.join(longer)} scored on the first token only; "
                f"a one-token word per label is scored exactly") if longer else None
        if note and note not in self.notes:
            self.notes.append(note)
        if len(set(ids)) < len(ids):
            raise ConfigError(
                f"verbalizer words {list(self.cfg.verbalizer.values())} share a first token; choose words "
                "that start differently")
        return ids

    def collate(self, examples: list[tuple[str, str]]) -> Batch:
        prompts = [prompt for prompt, _ in examples]
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
        handle = head.register_forward_pre_hook(
            lambda module, args: (args[0][rows, batch.last].unsqueeze(1),) + args[1:])
        try:
            yield
        finally:
            handle.remove()

    def sequences(self, batch: Batch) -> Batch:
        return batch

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, C) verbalizer logits from one forward, inside `head(model, batch)`."""
        out = self.forward(model, batch)
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

    def evaluate_batch(self, model: nn.Module, batch: Batch, lockstep: bool = False) -> dict[str, float]:
        logits = self.class_logits(model, batch)
        predicted, labels = logits.argmax(1), batch.labels
        counts = {"n": len(batch), "loss": float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
                  "correct": int((predicted == labels).sum())}
        for c in range(len(self.labels)):  # per class: true positives, predictions, gold labels (for macro F1)
            counts.update({f"tp{c}": int(((predicted == c) & (labels == c)).sum()),
                           f"predicted{c}": int((predicted == c).sum()),
                           f"gold{c}": int((labels == c).sum())})
        return counts

    def zero_counts(self) -> dict[str, float]:
        return dict.fromkeys(["n", "loss", "correct"] + [f"{k}{c}" for c in range(len(self.labels))
                                                          for k in ("tp", "predicted", "gold")], 0)

    def metrics(self, counts: dict[str, float]) -> dict:
        n = max(counts["n"], 1)
        f1 = [2 * counts[f"tp{c}"] / (counts[f"predicted{c}"] + counts[f"gold{c}"]) for c in range(len(self.labels))
              if counts[f"predicted{c}"] + counts[f"gold{c}"]]
        return {"metric": self.cfg.metric, "accuracy": counts["correct"] / n, "f1": sum(f1) / max(len(f1), 1),
                "loss": counts["loss"] / n, "n": int(counts["n"])}


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


CLASS_OBJECTIVES = {"loss": lambda logits, labels: nn.functional.cross_entropy(logits, labels),
                    "accuracy": _error_rate,  # minimised: 1 − accuracy
                    "f1": _one_minus_macro_f1}  # minimised: 1 − macro F1
