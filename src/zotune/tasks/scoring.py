"""Scoring answers after prompts: sequences = prompt + answer, and the log-probabilities of the answer's
tokens (multiple choice scores every candidate; generation trains on its reference answer)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from zotune.tasks.base import Movable


@dataclass
class Scored(Movable):
    """Sequences = prompt + answer, right-padded, with the positions whose next token is scored.

    Target p is token `targets[p]`, predicted at position `cols[p]` of sequence `rows[p]`.
    """

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor
    rows: torch.Tensor  # (P,)
    cols: torch.Tensor
    targets: torch.Tensor


def scored_sequences(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> Scored:
    """Each prompt's ids followed by its answer's, every answer token a target."""
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    ids = torch.full((len(prompts), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, targets = [], [], []
    for r, (p, a) in enumerate(zip(prompts, answers)):
        ids[r, : lengths[r]] = torch.tensor(p + a)
        mask[r, : lengths[r]] = 1
        rows += [r] * len(a)
        cols += range(len(p) - 1, len(p) + len(a) - 1)
        targets += a
    return Scored(ids, mask, torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long),
                  torch.tensor(targets, dtype=torch.long))


@contextlib.contextmanager
def picked_positions(model: nn.Module, rows: torch.Tensor, cols: torch.Tensor):
    """Within this block the LM head sees only hidden states (rows[p], cols[p]), as one (1, P, H) row."""
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: (args[0][rows, cols].unsqueeze(0),) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


def target_logprobs(model: nn.Module, batch: Scored) -> torch.Tensor:
    """(P,) log-probability of every target token, from one forward inside `picked_positions`."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    return logits.log_softmax(-1).gather(1, batch.targets[:, None])[:, 0]
