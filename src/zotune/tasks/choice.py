"""Multiple choice: every candidate scored by its log-likelihood after the prompt.

A candidate's score is the mean log-probability of its tokens following the prompt (the length-
normalised score MeZO predicts with); the loss is the cross-entropy of the correct candidate over
the scores (MeZO's `train_as_classification`), so single-token candidates give exactly the
classification loss. Candidates of different lengths and numbers batch together: every (example,
candidate) pair is one sequence, and the LM head runs on the candidates' positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.tasks.base import Movable, Task, TaskConfig, load_function
from zotune.tasks.scoring import Scored, picked_positions, scored_sequences, target_logprobs
from zotune.tasks.sources import Table


@dataclass
class ChoiceBatch(Movable):
    sequences: Scored  # one per (example, candidate)
    owner: torch.Tensor  # (N,) the example of each sequence
    slot: torch.Tensor  # (N,) its candidate's index in the example
    correct: torch.Tensor  # (B, C) bool: the correct candidates (one or more)
    labels: torch.Tensor  # (B,) the first correct candidate: the cross-entropy target

    def __len__(self) -> int:
        return len(self.labels)


class MultipleChoiceTask(Task):
    """An example is (prompt, candidates, indices of the correct candidates)."""

    def __init__(self, cfg: TaskConfig, tokenizer, table: Table):
        super().__init__(cfg, tokenizer, table)
        self._objective = {"loss": _cross_entropy, "accuracy": _error_rate}.get(cfg.objective)
        self._user_objective = None if self._objective else load_function(cfg.objective, "task.objective")

    def example(self, row: dict, where: str) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
        cfg = self.cfg
        prompt = self.render(cfg.template, row, where)
        single = cfg.choices[0].strip()
        listed = len(cfg.choices) == 1 and single.startswith("{") and single.endswith("}") and \
            isinstance(row.get(single[1:-1]), (list, tuple))
        if listed:
            candidates = tuple(str(c) for c in row[single[1:-1]])
        else:
            candidates = tuple(self.render(c, row, where, f"task.choices[{i}]") for i, c in enumerate(cfg.choices))
        if len(candidates) < 2:
            raise ConfigError(f"{where}: {len(candidates)} candidate(s); a multiple-choice example needs at least two")
        label = self.column(row, cfg.label_column, where)
        correct = []
        for value in label if isinstance(label, (list, tuple)) else [label]:
            index = self.label_index(value)
            if index is None and str(value) in cfg.label_names:
                index = cfg.label_names.index(str(value))
            if index is None and str(value) in candidates:
                index = candidates.index(str(value))
            if index is None or not 0 <= index < len(candidates):
                raise ConfigError(f"{where}: label {value!r} names no candidate; give the candidate's index (0.."
                                  f"{len(candidates) - 1}), its text, or a name in task.label_names")
            correct.append(index)
        if not correct:
            raise ConfigError(f"{where}: no correct candidate (label {label!r}); every example needs one")
        return prompt, candidates, tuple(dict.fromkeys(correct))

    def collate(self, examples: list) -> ChoiceBatch:
        keep = self.cfg.max_length
        prompts, answers, owner, slot = [], [], [], []
        candidate_ids = self.tokenizer([self.spaced(p, c) for p, cs, _ in examples for c in cs],
                                       add_special_tokens=False)["input_ids"]
        prompt_ids = self.tokenizer([p for p, _, _ in examples])["input_ids"]
        k = 0
        for b, (_, candidates, _) in enumerate(examples):
            for c in range(len(candidates)):
                answer = candidate_ids[k][: keep - 1] or [self.pad_id()]  # (an empty candidate scores its padding)
                prompts.append(prompt_ids[b][-(keep - len(answer)):])
                answers.append(answer)
                owner.append(b)
                slot.append(c)
                k += 1
        width = max(len(cs) for _, cs, _ in examples)
        correct = torch.zeros(len(examples), width, dtype=torch.bool)
        for b, (_, _, right) in enumerate(examples):
            correct[b, list(right)] = True
        return ChoiceBatch(scored_sequences(prompts, answers, self.pad_id()), torch.tensor(owner), torch.tensor(slot),
                           correct, torch.tensor([right[0] for _, _, right in examples]))

    def sequences(self, batch: ChoiceBatch) -> Scored:
        return batch.sequences

    def head(self, model: nn.Module, batch: ChoiceBatch):
        return picked_positions(model, batch.sequences.rows, batch.sequences.cols)

    def scores_in_head(self, model: nn.Module, batch: ChoiceBatch) -> torch.Tensor:
        """(B, C) mean log-probability of each candidate's tokens (-inf where an example has fewer)."""
        seq = batch.sequences
        logprobs = target_logprobs(model, seq)
        n = len(batch.owner)
        sums = torch.zeros(n, device=logprobs.device).index_add_(0, seq.rows, logprobs)
        counts = torch.zeros(n, device=logprobs.device).index_add_(0, seq.rows, torch.ones_like(logprobs))
        scores = torch.full(batch.correct.shape, float("-inf"), device=logprobs.device)
        scores[batch.owner, batch.slot] = sums / counts
        return scores

    def scores(self, model: nn.Module, batch: ChoiceBatch) -> torch.Tensor:
        with self.head(model, batch):
            return self.scores_in_head(model, batch)

    def head_loss(self, model: nn.Module, batch: ChoiceBatch) -> torch.Tensor:
        scores = self.scores_in_head(model, batch)
        if self._objective is not None:
            return self._objective(scores, batch)
        return self._user_objective(scores, batch.labels)

    def evaluate_batch(self, model: nn.Module, batch: ChoiceBatch, lockstep: bool = False) -> dict[str, float]:
        scores = self.scores(model, batch)
        return {"n": len(batch), "loss": float(_cross_entropy(scores, batch) * len(batch)),
                "correct": int(_hits(scores, batch).sum())}

    def zero_counts(self) -> dict[str, float]:
        return {"n": 0, "loss": 0.0, "correct": 0}

    def metrics(self, counts: dict[str, float]) -> dict:
        n = max(counts["n"], 1)
        return {"metric": self.cfg.metric, "accuracy": counts["correct"] / n, "loss": counts["loss"] / n,
                "n": int(counts["n"])}


def _cross_entropy(scores: torch.Tensor, batch: ChoiceBatch) -> torch.Tensor:
    return nn.functional.cross_entropy(scores, batch.labels)


def _hits(scores: torch.Tensor, batch: ChoiceBatch) -> torch.Tensor:
    """(B,) whether the best-scored candidate is a correct one."""
    return batch.correct[torch.arange(len(batch), device=scores.device), scores.argmax(-1)]


def _error_rate(scores: torch.Tensor, batch: ChoiceBatch) -> torch.Tensor:
    return 1 - _hits(scores, batch).float().mean()

