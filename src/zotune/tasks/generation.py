"""Generation: trained with teacher forcing on the answer, evaluated by greedy decoding.

The training loss is the mean cross-entropy of the answer's tokens (the first gold answer, then
`task.stop`) after the prompt. Evaluation decodes greedily, batched, with the model's KV cache,
cuts the text at `task.stop`, and scores it against every gold answer with SQuAD's exact match and
token F1 (the best over the gold answers). Exact match or F1 can also be the ZO objective
(`task.objective=f1`): each probe then decodes.
"""

from __future__ import annotations

import contextlib
import re
import string
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from zotune.config import ConfigError
from zotune.tasks.base import Movable, Task, TaskConfig, load_function
from zotune.tasks.scoring import Scored, picked_positions, scored_sequences, target_logprobs
from zotune.tasks.sources import Table


@dataclass
class GenerationBatch(Movable):
    teacher: Scored  # prompt + first gold answer + stop: the teacher-forcing loss
    prompt_ids: torch.Tensor  # (B, T) left-padded prompts: where decoding starts
    prompt_mask: torch.Tensor
    answers: list[tuple[str, ...]] = field(default_factory=list)  # the gold answers of each example

    def __len__(self) -> int:
        return len(self.answers)


class GenerationTask(Task):
    """An example is (prompt, gold answers)."""

    def __init__(self, cfg: TaskConfig, tokenizer, table: Table):
        super().__init__(cfg, tokenizer, table)
        self.fixed_inputs = cfg.objective == "loss"  # a decoding objective feeds the model its own tokens
        self._user_objective = None if cfg.objective in ("loss", "f1", "exact_match") else \
            load_function(cfg.objective, "task.objective")

    def example(self, row: dict, where: str) -> tuple[str, tuple[str, ...]]:
        value = self.column(row, self.cfg.answer, where)
        answers = tuple(str(a) for a in value) if isinstance(value, (list, tuple)) else (str(value),)
        if not answers or not any(a.strip() for a in answers):
            raise ConfigError(f"{where}: task.answer={self.cfg.answer} is empty; every example needs a gold answer "
                              f"(drop such rows, or fill them with task.prepare)")
        return self.render(self.cfg.template, row, where), answers

    def collate(self, examples: list) -> GenerationBatch:
        cfg, tok = self.cfg, self.tokenizer
        prompts = [p for p, _ in examples]
        keep = cfg.max_length - cfg.max_new_tokens
        prompt_ids = self.prompt_ids(prompts, keep)
        targets = tok([self.spaced(p, a[0].strip()) + cfg.stop for p, a in examples],
                      add_special_tokens=False)["input_ids"]
        teacher = scored_sequences(prompt_ids, [t[: cfg.max_new_tokens] for t in targets], self.pad_id())
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(examples), width), self.pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompt_ids):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        return GenerationBatch(teacher, ids, mask, [a for _, a in examples])

    # -- the loss -------------------------------------------------------------------------------
    def sequences(self, batch: GenerationBatch) -> Scored:
        return batch.teacher

    def head(self, model: nn.Module, batch: GenerationBatch):
        if self.cfg.objective != "loss":
            return contextlib.nullcontext()
        return picked_positions(model, batch.teacher.rows, batch.teacher.cols)

    def head_loss(self, model: nn.Module, batch: GenerationBatch) -> torch.Tensor:
        if self.cfg.objective == "loss":
            return -target_logprobs(model, batch.teacher).mean()
        predictions = self.generate(model, batch)
        if self._user_objective is not None:
            return self._user_objective(predictions, batch.answers)
        score = exact_match if self.cfg.objective == "exact_match" else token_f1
        return torch.tensor(1 - sum(best(score, p, a) for p, a in zip(predictions, batch.answers)) / len(batch))

    # -- decoding ---------------------------------------------------------------------------------
    def generate(self, model: nn.Module, batch: GenerationBatch, lockstep: bool = False) -> list[str]:
        """Greedy answers, cut at `task.stop`. With `lockstep`, always `max_new_tokens` forwards
        (ranks that fetch streamed blocks together must run as many forwards as each other).

        The prompts run once and each new token reads the KV cache, with explicit position ids (the
        prompts are left-padded). A model that rebuilds its cache on every call (PEFT prefix tuning
        puts its prefix there) instead reruns the whole right-padded sequence for each new token.
        """
        peft_config = getattr(model, "active_peft_config", None)
        cached = not getattr(peft_config, "is_prompt_learning", False)
        tok, stop = self.tokenizer, self.cfg.stop
        rows = len(batch)
        generated = torch.empty(rows, 0, dtype=torch.long, device=batch.prompt_ids.device)
        done = torch.zeros(rows, dtype=torch.bool, device=generated.device)
        step = self._cached_steps(model, batch) if cached else self._recomputed_steps(model, batch)
        for _ in range(self.cfg.max_new_tokens):
            token = step(generated)
            generated = torch.cat([generated, token[:, None]], 1)
            if tok.eos_token_id is not None:
                done |= token == tok.eos_token_id
            if stop:
                done |= torch.tensor([stop in tok.decode(g) for g in generated[:, -4:].tolist()], device=done.device)
            if bool(done.all()) and not lockstep:
                break
        texts = tok.batch_decode(generated, skip_special_tokens=True)
        return [(text.split(stop)[0] if stop else text).strip() for text in texts]

    def _cached_steps(self, model: nn.Module, batch: GenerationBatch):
        """generated -> next tokens: the prompts once, then one token per row per call, with the cache."""
        state = {"ids": batch.prompt_ids, "mask": batch.prompt_mask, "past": None,
                 "positions": (batch.prompt_mask.cumsum(1) - 1).clamp(min=0)}

        def step(generated: torch.Tensor) -> torch.Tensor:
            if generated.shape[1]:
                state["ids"], state["positions"] = generated[:, -1:], state["positions"][:, -1:] + 1
                state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
            ids = state["ids"]
            rows = torch.arange(len(ids), device=ids.device)
            with picked_positions(model, rows, torch.full_like(rows, ids.shape[1] - 1)):  # left-padded: the last column
                out = model(input_ids=ids, attention_mask=state["mask"], position_ids=state["positions"],
                            past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[0].argmax(-1)

        return step

    def _recomputed_steps(self, model: nn.Module, batch: GenerationBatch):
        """generated -> next tokens: every call runs prompt + generated, right-padded, in full."""
        prompts = [ids[mask.bool()] for ids, mask in zip(batch.prompt_ids, batch.prompt_mask)]

        def step(generated: torch.Tensor) -> torch.Tensor:
            rows = [torch.cat([p, g]) for p, g in zip(prompts, generated)]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id(), dtype=torch.long, device=generated.device)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(rows):
                ids[r, : len(row)], mask[r, : len(row)] = row, 1
            with picked_positions(model, torch.arange(len(rows), device=ids.device), mask.sum(1) - 1):
                out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            return out.logits[0].argmax(-1)

        return step

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate_batch(self, model: nn.Module, batch: GenerationBatch, lockstep: bool = False) -> dict[str, float]:
        with picked_positions(model, batch.teacher.rows, batch.teacher.cols):
            logprobs = target_logprobs(model, batch.teacher)
        predictions = self.generate(model, batch, lockstep)
        return {"n": len(batch), "nll": float(-logprobs.sum()), "tokens": len(logprobs),
                "exact_match": sum(best(exact_match, p, a) for p, a in zip(predictions, batch.answers)),
                "f1": sum(best(token_f1, p, a) for p, a in zip(predictions, batch.answers))}

    def zero_counts(self) -> dict[str, float]:
        return {"n": 0, "nll": 0.0, "tokens": 0, "exact_match": 0.0, "f1": 0.0}

    def metrics(self, counts: dict[str, float]) -> dict:
        n = max(counts["n"], 1)
        return {"metric": self.cfg.metric, "f1": counts["f1"] / n, "exact_match": counts["exact_match"] / n,
                "loss": counts["nll"] / max(counts["tokens"], 1), "n": int(counts["n"])}


# -- SQuAD's answer metrics ----------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's evaluation script)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if not same:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def best(score, prediction: str, answers) -> float:
    """The best score of `prediction` over the gold answers."""
    return max(score(prediction, gold) for gold in answers)
